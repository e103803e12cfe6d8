import numpy as np
import pytest
from PIL import Image

from badfiles import make_bad_folder, make_large_jpeg
from engines.imageio import ImageReadError, load_rgb


@pytest.fixture(scope="module")
def bad(tmp_path_factory, records):
    folder = tmp_path_factory.mktemp("bad")
    return folder, make_bad_folder(folder, records[0].path), records[0].path


def test_each_awkward_file(bad):
    folder, expect, source = bad
    for name, outcome in expect.items():
        if outcome == "ok":
            rgb = load_rgb(folder / name)
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3, name
        else:
            with pytest.raises(ImageReadError) as e:
                load_rgb(folder / name)
            msg = str(e.value)
            assert name in msg and "\n" not in msg, msg


def test_messages_name_the_problem(bad):
    folder, _, _ = bad
    for name, words in (("zero_bytes.jpg", "empty file"), ("truncated.jpg", "truncated"), ("notes.jpg", "not an image")):
        with pytest.raises(ImageReadError, match=words):
            load_rgb(folder / name)


def test_exif_orientation_is_applied(bad):
    folder, _, source = bad
    plain = np.asarray(Image.open(source).convert("RGB"))
    rotated = load_rgb(folder / "exif_rotated.jpg")
    assert plain.shape[:2] == (150, 200) and rotated.shape[:2] == (200, 150)
    expected = np.rot90(plain, k=-1)  # orientation 6 = rotate 90 degrees clockwise to display
    assert np.abs(rotated.astype(int) - expected.astype(int)).mean() < 8  # JPEG re-encoding noise only


def test_sixteen_bit_tiff_keeps_its_range(bad):
    folder, _, source = bad
    gray = np.asarray(Image.open(source).convert("L")).astype(int)
    rgb = load_rgb(folder / "sixteen_bit.tif")
    assert np.abs(rgb[..., 0].astype(int) - gray).max() <= 1


def test_very_large_jpeg_decodes_reduced(tmp_path, records):
    path = tmp_path / "huge.jpg"
    make_large_jpeg(path, records[0].path)
    rgb = load_rgb(path)
    assert rgb.shape[1] <= 3000 and rgb.shape[1] >= 1024 and rgb.shape[0] * 4 == rgb.shape[1] * 3
