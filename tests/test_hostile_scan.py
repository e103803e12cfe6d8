"""dermscan against a hostile user: every kind of awkward input, output and concurrency tried in issue #11.

Each test is marked with the kinds it covers (`@pytest.mark.hostile(...)`); the session summary counts them.
"""
import csv
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hostile import make_huge_jpeg, make_hostile_folder
from engines.labels import CLASS_CODES

pytestmark = pytest.mark.slow
SCAN = [sys.executable, "-m", "engines.scan.cli"]
def run_scan(*args, timeout=300, prefix=(), **kw):
    return subprocess.run([*prefix, *SCAN, *map(os.fsdecode, args)], capture_output=True, timeout=timeout, **kw)


def rows_of(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def name_of(cell: str) -> str:
    return cell[1:] if cell.startswith("'") else cell


def assert_clean(r, code=0):
    err = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert r.returncode == code, err
    return err


def digest(folder: Path) -> dict[bytes, str]:
    out = {}
    for root, _, files in os.walk(os.fsencode(folder)):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                out[p] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


@pytest.fixture()
def hostile(tmp_path, records):
    folder = tmp_path / "hostile"
    return folder, make_hostile_folder(folder, records[0].path)


@pytest.mark.hostile("non-utf8 name", "CR in name", "LF in name", "quote and comma in name", "formula names", "unicode name",
                     "gif", "webp", "animated gif", "heic", "float tiff", "1x1 image", "blank image", "1x40000 image",
                     "40x40000 thumbnail", "fifo", "/dev/urandom link", "dangling link", "symlink to a folder in the tree",
                     "symlink loop", "isic stems collide", "inputs unchanged", "formula cells in isic")
def test_hostile_folder_every_file_a_row(hostile, tiny_onnx, tmp_path):
    folder, expect = hostile
    before = digest(folder)
    out, html, isic = tmp_path / "r.csv", tmp_path / "r.html", tmp_path / "isic.csv"
    r = run_scan(folder, "--model", tiny_onnx, "--recursive", "--out", out, "--html", html, "--isic", isic,
                 "--batch", "4")
    err = assert_clean(r)
    rows = rows_of(out)
    got = {name_of(x["file"]): x for x in rows}
    assert len(rows) == len(got) == len(expect), sorted(set(got) ^ set(expect))
    for name, e in expect.items():
        row = got[name]
        assert row["status"] == e.status, (name, row)
        if e.status == "error":
            assert e.phrase.lower() in row["error"].lower(), (name, row["error"])
            assert "\n" not in row["error"] and "\r" not in row["error"]
        else:
            assert abs(sum(float(row[c]) for c in CLASS_CODES) - 1) < 1e-4
    for raw in ("=HYPERLINK(1).jpg", "+cmd.jpg", "-2.jpg", "@sum.jpg", "'apostrophe.jpg"):
        assert "'" + raw in got[raw]["file"], "formula-like names are neutralised with one apostrophe"
    assert "a_link" in err and "already scanned" in err  # the link is blamed, not the real folder
    assert not any(n.startswith("a_link/") for n in got)
    with open(isic, newline="", encoding="utf-8") as f:
        ids = [x["image"] for x in csv.DictReader(f)]
    assert len(ids) == len(set(ids)) == sum(e.status == "ok" for e in expect.values())
    assert {"lesion.gif", "b/lesion.gif", "lesion.webp", "inside"} <= set(ids)
    assert all(not i.startswith(("=", "+", "-", "@")) for i in ids)
    page = html.read_text(encoding="utf-8")
    assert page.count("data:image/jpeg;base64,") == sum(e.status == "ok" for e in expect.values())
    assert str(folder.resolve()) in page
    assert digest(folder) == before


@pytest.mark.hostile("float tiff values")
def test_float_tiff_is_not_black(records, tmp_path):
    from engines.imageio import load_rgb
    folder = tmp_path / "t"
    make_hostile_folder(folder, records[0].path)
    rgb = load_rgb(folder / "float_unit.tif")
    src = load_rgb(records[0].path).astype(np.float64).mean(axis=2)  # what the float TIFF was made from
    assert np.abs(rgb[..., 0] - src).max() <= 1.0


@pytest.mark.hostile("20000x20000 jpeg")
def test_huge_jpeg_is_decoded_reduced(tmp_path, tiny_onnx):
    folder = tmp_path / "huge"
    folder.mkdir()
    make_huge_jpeg(folder / "huge.jpg")
    out = tmp_path / "r.csv"
    assert_clean(run_scan(folder, "--model", tiny_onnx, "--out", out))
    row = rows_of(out)[0]
    assert row["status"] == "ok" and int(row["width"]) <= 2500


@pytest.mark.hostile("unreadable subfolder")
def test_unreadable_subfolder_is_an_error_row(tmp_path, tiny_onnx, sample_images):
    from test_dermscan import _without_file_override
    folder = tmp_path / "perm"
    (folder / "locked").mkdir(parents=True)
    shutil.copy(sample_images[0], folder / "fine.jpg")
    shutil.copy(sample_images[1], folder / "locked" / "hidden.jpg")
    os.chmod(folder / "locked", 0)
    out = tmp_path / "r.csv"
    try:
        r = run_scan(folder, "--model", tiny_onnx, "--recursive", "--out", out, "--quiet",
                     prefix=_without_file_override())
    finally:
        os.chmod(folder / "locked", 0o755)
    assert_clean(r)
    rows = {x["file"]: x for x in rows_of(out)}
    assert rows["fine.jpg"]["status"] == "ok"
    assert rows["locked/"]["status"] == "error" and "cannot list folder" in rows["locked/"]["error"]


@pytest.fixture()
def small_folder(tmp_path, sample_images):
    folder = tmp_path / "clinic"
    folder.mkdir()
    for p in sample_images[:6]:
        shutil.copy(p, folder / p.name)
    return folder


@pytest.mark.hostile("--out is an input", "--html is an input", "--out equals --html", "--out exists without --resume",
                     "--out is not a results file", "--out names an image", "--isic equals the sidecar")
def test_outputs_never_overwrite_inputs_or_each_other(small_folder, tiny_onnx, tmp_path):
    before = digest(small_folder)
    first = sorted(small_folder.iterdir())[0]
    cases = [("--out", first), ("--html", first)]
    for flag, target in cases:
        args = ["--out", tmp_path / "r.csv"] if flag == "--html" else []
        r = run_scan(small_folder, "--model", tiny_onnx, *args, flag, target)
        err = assert_clean(r, 2)
        assert err.count("error") == 1 and "overwrite" in err or "image" in err
    r = run_scan(small_folder, "--model", tiny_onnx, "--out", tmp_path / "x.csv", "--html", tmp_path / "x.csv")
    assert "both" in assert_clean(r, 2)
    r = run_scan(small_folder, "--model", tiny_onnx, "--out", tmp_path / "y.jpg")
    assert "image" in assert_clean(r, 2)
    r = run_scan(small_folder, "--model", tiny_onnx, "--out", tmp_path / "z.csv", "--isic", tmp_path / "z.csv.json")
    assert "sidecar" in assert_clean(r, 2)
    out = tmp_path / "r.csv"
    assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", out))
    kept = out.read_bytes()
    assert "--resume" in assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", out), 2)
    assert out.read_bytes() == kept
    assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", out, "--overwrite", "--limit", "2"))
    assert len(rows_of(out)) == 2
    notes = tmp_path / "notes.csv"
    notes.write_text("my own notes\n")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert "not a dermscan results file" in assert_clean(
            run_scan(small_folder, "--model", tiny_onnx, "--out", notes, *extra), 2)
    assert notes.read_text() == "my own notes\n"
    assert digest(small_folder) == before


@pytest.mark.hostile("resume with another model", "resume into another folder's CSV", "resume with other options",
                     "resume without a sidecar")
def test_resume_refuses_another_model_folder_or_options(small_folder, tiny_onnx, tmp_path, sample_images):
    out = tmp_path / "r.csv"
    assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", out, "--limit", "3"))
    kept = out.read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(sample_images[7], other / "x.jpg")
    for args, phrase in (((small_folder, "--model", "convnext"), "model"),
                         ((other, "--model", tiny_onnx), "folder"),
                         ((small_folder, "--model", tiny_onnx, "--tta", "flip"), "--tta"),
                         ((small_folder, "--model", tiny_onnx, "--recursive"), "--recursive")):
        err = assert_clean(run_scan(*args, "--out", out, "--resume"), 2)
        assert phrase in err and "mix" in err, err
        assert out.read_bytes() == kept
    os.unlink(str(out) + ".json")
    assert "sidecar" in assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", out, "--resume"), 2) \
        or ".json" in assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", out, "--resume"), 2)


@pytest.mark.hostile("resume retries fixed files")
def test_resume_retries_errors_without_duplicates(small_folder, tiny_onnx, tmp_path, sample_images):
    broken = small_folder / "later.jpg"
    broken.write_bytes(sample_images[0].read_bytes()[:300])
    out = tmp_path / "r.csv"
    assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", out))
    assert {x["file"]: x["status"] for x in rows_of(out)}["later.jpg"] == "error"
    shutil.copy(sample_images[0], broken)
    assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", out, "--resume"))
    rows = rows_of(out)
    assert len(rows) == len({x["file"] for x in rows}) == 7
    assert all(x["status"] == "ok" for x in rows)


@pytest.mark.hostile("two scans into one --out", "two --resume runs at once")
def test_two_scans_into_one_output(tiny_onnx, data_dir, tmp_path):
    out = tmp_path / "r.csv"
    p = subprocess.Popen([*SCAN, str(data_dir / "images"), "--model", str(tiny_onnx), "--out", str(out), "--batch",
                          "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.05)
        for extra in ([], ["--resume"], ["--overwrite"]):
            r = run_scan(data_dir / "images", "--model", tiny_onnx, "--out", out, *extra)
            err = assert_clean(r, 2)
            assert f"pid {p.pid}" in err, err
        assert p.poll() is None, "the first scan was still running during every attempt"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    data = out.read_bytes()
    assert b"\x00" not in data
    rows = rows_of(out)
    assert len(rows) == len({x["file"] for x in rows}) > 0
    assert all(x["status"] == "ok" for x in rows)


@pytest.mark.hostile("--limit -1", "--batch 0")
def test_bad_numbers_and_limits(small_folder, tiny_onnx, tmp_path):
    for args in (("--limit", "-1"), ("--batch", "0")):
        err = assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", tmp_path / "r.csv", *args), 2)
        assert args[0] in err
    assert not (tmp_path / "r.csv").exists()


def _with_bundle(tiny_onnx: Path, path: Path, **changes) -> Path:
    import json
    import onnx
    from engines.bundle import METADATA_KEY
    proto = onnx.load(str(tiny_onnx))
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            d = json.loads(p.value)
            d.update(changes)
            p.value = json.dumps(d)
    onnx.save(proto, str(path))
    return path


def _wrong_shape_model(tiny_onnx: Path, path: Path) -> Path:
    """A real graph with the bundle's metadata whose logits have 3 classes instead of 7."""
    import onnx
    from onnx import TensorProto, helper
    src = onnx.load(str(tiny_onnx))
    size = src.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], np.eye(3, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"]),
         helper.make_node("MatMul", ["flat", "w"], ["logits"])],
        "wrong", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = src.ir_version
    del model.metadata_props[:]
    model.metadata_props.extend(src.metadata_props)
    onnx.save(model, str(path))
    return path


@pytest.mark.hostile("model with wrong output shape", "NaN threshold", "temperature 0", "threshold above 1",
                     "melanoma flag offsets of the wrong length", "bundle from a newer runtime")
def test_unusable_models_are_refused_before_the_csv_is_touched(small_folder, tiny_onnx, tmp_path):
    out = tmp_path / "r.csv"
    assert_clean(run_scan(small_folder, "--model", tiny_onnx, "--out", out, "--limit", "2"))
    kept = out.read_bytes()
    models = {"shape": _wrong_shape_model(tiny_onnx, tmp_path / "wrong.onnx"),
              "threshold": _with_bundle(tiny_onnx, tmp_path / "nan.onnx", mel_threshold=float("nan")),
              "temperature": _with_bundle(tiny_onnx, tmp_path / "t0.onnx", temperature=0.0),
              "[0, 1]": _with_bundle(tiny_onnx, tmp_path / "big.onnx", mel_threshold=1.5),
              "mel_flag_offsets": _with_bundle(tiny_onnx, tmp_path / "off.onnx", version=2, mel_flag_offsets=[0.5, 1.0]),
              "newer than this runtime": _with_bundle(tiny_onnx, tmp_path / "v9.onnx", version=9, colour_space="lab")}
    for phrase, model in models.items():
        for extra in (["--overwrite"], ["--resume"]):
            err = assert_clean(run_scan(small_folder, "--model", model, "--out", out, *extra), 2)
            assert phrase in err and len([x for x in err.splitlines() if "error" in x]) == 1, err
            assert out.read_bytes() == kept


@pytest.mark.hostile("disk full")
def test_disk_full_names_the_file(small_folder, tiny_onnx, tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        r = run_scan(small_folder, "--model", tiny_onnx, "--out", mnt / "r.csv", "--html", mnt / "r.html")
        err = assert_clean(r, 2)
        assert str(mnt) in err and "No space left" in err, err
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.hostile("cut inside a quoted multi-line name")
def test_tail_cut_inside_a_quoted_multiline_name(tmp_path, tiny_onnx, records):
    folder = tmp_path / "ml"
    folder.mkdir()
    for i, name in enumerate(["a.jpg", "multi\r\nline.jpg", "z.jpg"]):
        shutil.copy(records[i].path, folder / name)
    out = tmp_path / "r.csv"
    assert_clean(run_scan(folder, "--model", tiny_onnx, "--out", out, "--limit", "1"))
    out.write_bytes(out.read_bytes() + b'"multi\r\nli')  # a crash while writing the quoted name
    assert_clean(run_scan(folder, "--model", tiny_onnx, "--out", out, "--resume"))
    rows = rows_of(out)
    assert [x["file"] for x in rows] == ["a.jpg", "multi\r\nline.jpg", "z.jpg"]
    assert all(x["status"] == "ok" for x in rows)


@pytest.mark.hostile("kill -9 then --resume with awkward names")
def test_kill_then_resume_is_exact_with_awkward_names(hostile, tiny_onnx, tmp_path):
    folder, expect = hostile
    out = tmp_path / "r.csv"
    p = subprocess.Popen([*SCAN, str(folder), "--model", str(tiny_onnx), "--recursive", "--out", str(out),
                          "--batch", "2", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\r\n") < 5):
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert_clean(run_scan(folder, "--model", tiny_onnx, "--recursive", "--out", out, "--resume"))
    rows = rows_of(out)
    assert len(rows) == len({x["file"] for x in rows}) == len(expect)
