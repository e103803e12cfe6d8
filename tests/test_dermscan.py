import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from badfiles import make_bad_folder, make_large_jpeg
from engines.labels import CLASS_CODES
from engines.scan.results import COLUMNS

pytestmark = pytest.mark.slow
SCAN = [sys.executable, "-m", "engines.scan.cli"]


def run_scan(*args, timeout=300, **kw):
    return subprocess.run([*SCAN, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kw)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture()
def real_folder(tmp_path, sample_images):
    folder = tmp_path / "clinic"
    (folder / "sub").mkdir(parents=True)
    for i, p in enumerate(sample_images):
        shutil.copy(p, (folder / "sub" if i % 3 == 0 else folder) / p.name)
    return folder


def test_scan_writes_csv_isic_and_html(real_folder, tiny_onnx, tmp_path, sample_images):
    out, html, isic = tmp_path / "r.csv", tmp_path / "r.html", tmp_path / "isic.csv"
    r = run_scan(real_folder, "--model", tiny_onnx, "--recursive", "--out", out, "--html", html, "--isic", isic,
                 "--batch", "4")
    assert r.returncode == 0, r.stderr
    rows = read_csv(out)
    assert tuple(rows[0].keys())[: len(COLUMNS)] == COLUMNS
    assert len(rows) == len(sample_images) and all(x["status"] == "ok" for x in rows)
    assert any(x["file"].startswith("sub/") for x in rows)
    for x in rows:
        probs = [float(x[c]) for c in CLASS_CODES]
        assert abs(sum(probs) - 1) < 1e-4 and x["label"] == CLASS_CODES[probs.index(max(probs))]
    with open(isic) as f:
        assert next(csv.reader(f)) == ["image", "MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    page = html.read_text()
    assert "Decision support, not a diagnosis" in page and page.count("data:image/jpeg;base64,") == len(rows)
    assert "melanoma suspects" in page and "<script>" in page
    assert "classified" in r.stdout.splitlines()[-1]
    assert not list(tmp_path.glob(".*lock")), "a finished scan leaves no lock file beside its reports"


def test_the_flag_reads_the_bundles_own_melanoma_score(real_folder, tiny_onnx, tmp_path):
    """A bundle with flag offsets: the CSV's melanoma_score is p(mel) re-weighted by exp(offsets), the flag is that
    score against the threshold, the HTML lists suspects by it; a bundle without offsets scores p(mel)."""
    import json
    import onnx
    from engines.bundle import METADATA_KEY
    proto = onnx.load(str(tiny_onnx))
    meta = next(p for p in proto.metadata_props if p.key == METADATA_KEY)
    d = json.loads(meta.value)
    threshold = d["mel_threshold"]
    for name, offsets in (("plain", []), ("own", [float(v) for v in np.log([.03, .05, .11, .01, .11, .67, .02])])):
        model, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}.csv"
        meta.value = json.dumps({**d, "version": 2, "mel_flag_offsets": offsets})
        onnx.save(proto, str(model))
        r = run_scan(real_folder, "--model", model, "--recursive", "--out", out, "--html", out.with_suffix(".html"))
        assert r.returncode == 0, r.stderr
        rows = read_csv(out)
        probs = np.array([[float(x[c]) for c in CLASS_CODES] for x in rows])
        score = np.array([float(x["melanoma_score"]) for x in rows])
        w = probs * np.exp(offsets or 0.0)
        np.testing.assert_allclose(score, w[:, 4] / w.sum(1), atol=2e-5)
        assert [x["melanoma_flag"] == "1" for x in rows] == list(score >= threshold)
        page = out.with_suffix(".html").read_text()
        files = [x["file"] for x in sorted(rows, key=lambda x: (x["melanoma_flag"] != "1", -float(x["melanoma_score"])))]
        positions = [page.index(f"data-file='{f}'") for f in files]
        assert positions == sorted(positions)  # suspects first, then by the flag's score
    assert not np.allclose(score, probs[:, 4], atol=1e-3)  # the offsets did change the score


def test_bad_files_are_recorded_and_the_scan_goes_on(tmp_path, tiny_onnx, records):
    folder = tmp_path / "bad"
    expect = make_bad_folder(folder, records[0].path)
    (folder / "loop").mkdir()
    os.symlink("..", folder / "loop" / "back_up")  # a symlink loop, reached with --recursive
    out = tmp_path / "r.csv"
    r = run_scan(folder, "--model", tiny_onnx, "--recursive", "--out", out, "--batch", "3")
    assert r.returncode == 0, r.stderr
    rows = {x["file"]: x for x in read_csv(out)}
    assert set(rows) == set(expect)  # every file once: the loop was not walked again
    for name, outcome in expect.items():
        assert rows[name]["status"] == outcome, (name, rows[name])
        if outcome == "error":
            assert name in rows[name]["error"] and "\n" not in rows[name]["error"]
    n_err = sum(v == "error" for v in expect.values())
    assert f"{n_err} errors" in r.stdout.splitlines()[-1]
    assert "already scanned" in r.stderr


def test_very_large_image_is_classified_with_bounded_memory(tmp_path, tiny_onnx, records):
    folder = tmp_path / "large"
    folder.mkdir()
    make_large_jpeg(folder / "huge.jpg", records[0].path)
    out = tmp_path / "r.csv"
    # VmHWM is this process's own peak (ru_maxrss would carry the pytest parent's peak across fork/exec).
    code = ("import re, sys; from engines.scan.cli import main; rc = main(sys.argv[1:]); "
            "print('MAXRSS', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, str(folder), "--model", str(tiny_onnx), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = read_csv(out)[0]
    assert row["status"] == "ok" and int(row["width"]) < 12000
    maxrss_mb = int(r.stdout.split("MAXRSS")[1].split()[0]) / 1024
    assert maxrss_mb < 600, f"peak memory {maxrss_mb:.0f} MB: the 108-megapixel image was decoded at full size"


def _without_file_override() -> list[str]:
    """Root reads any file: run the scan without the capabilities that let it, so permissions apply."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without util-linux setpriv: cannot make a file unreadable")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search"]


def test_unreadable_file_without_permission(tmp_path, tiny_onnx, sample_images):
    folder = tmp_path / "perm"
    folder.mkdir()
    shutil.copy(sample_images[0], folder / "fine.jpg")
    shutil.copy(sample_images[1], folder / "secret.jpg")
    os.chmod(folder / "secret.jpg", 0)
    out = tmp_path / "r.csv"
    r = subprocess.run([*_without_file_override(), *SCAN, str(folder), "--model", str(tiny_onnx), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {x["file"]: x for x in read_csv(out)}
    assert rows["fine.jpg"]["status"] == "ok"
    assert rows["secret.jpg"]["status"] == "error" and "permission denied" in rows["secret.jpg"]["error"]


def test_kill_9_loses_at_most_a_batch_and_resume_completes(tmp_path, tiny_onnx, data_dir):
    folder = data_dir / "images"
    out = tmp_path / "r.csv"
    p = subprocess.Popen([*SCAN, folder, "--model", tiny_onnx, "--out", out, "--batch", "16", "--limit", "3000",
                          "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 200):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    data = out.read_bytes()
    before = read_csv(out)
    assert 100 < len(before) < 3000
    assert all(r["status"] == "ok" and r["vasc"] != "" for r in before), "no broken row after kill -9"
    assert data.endswith(b"\n")
    r = run_scan(folder, "--model", tiny_onnx, "--out", out, "--batch", "16", "--limit", "3000", "--resume", timeout=600)
    assert r.returncode == 0, r.stderr
    after = read_csv(out)
    files = [x["file"] for x in after]
    assert len(after) == 3000 and len(set(files)) == 3000
    assert [x["file"] for x in after[: len(before)]] == [x["file"] for x in before]


def test_resume_repairs_a_partial_last_row(tmp_path, tiny_onnx, real_folder):
    out = tmp_path / "r.csv"
    assert run_scan(real_folder, "--model", tiny_onnx, "--out", out, "--limit", "5").returncode == 0
    out.write_bytes(out.read_bytes() + b"ISIC_broken.jpg,ok,,nv,0.5")  # a crash in the middle of a row
    r = run_scan(real_folder, "--model", tiny_onnx, "--out", out, "--resume")
    assert r.returncode == 0, r.stderr
    rows = read_csv(out)
    assert all(x["file"] != "ISIC_broken.jpg" for x in rows)
    assert len(rows) == len({x["file"] for x in rows}) == len(list(real_folder.glob("*.jpg")))


@pytest.mark.parametrize("case", ["missing_folder", "corrupt_model", "no_metadata", "unwritable_out"])
def test_fatal_problems_exit_nonzero_with_one_line(case, tmp_path, tiny_onnx, real_folder):
    folder, model, out = real_folder, tiny_onnx, tmp_path / "r.csv"
    if case == "missing_folder":
        folder = tmp_path / "nowhere"
    elif case == "corrupt_model":
        model = tmp_path / "corrupt.onnx"
        model.write_bytes(tiny_onnx.read_bytes()[:5000])
    elif case == "no_metadata":
        import onnx
        proto = onnx.load(str(tiny_onnx))
        del proto.metadata_props[:]
        model = tmp_path / "plain.onnx"
        onnx.save(proto, str(model))
    else:
        out = tmp_path / "ro" / "r.csv"
        out.parent.mkdir()
        out.mkdir()  # a folder where the CSV should go: unwritable whoever runs the test
    r = run_scan(folder, "--model", model, "--out", out)
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("dermscan: error:") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "r.csv").exists() or case == "unwritable_out"


def test_default_and_named_models_load():
    import onnx
    from engines.select import default_model, open_engine, shipped_models
    assert default_model().is_file()
    for name in ["default", *shipped_models()]:
        eng = open_engine(name, "cpu").engine
        assert eng.bundle.classes == tuple(CLASS_CODES)
        # shipped as `dermconvert` writes them now: no shape arithmetic for every call to run (README, Conversion)
        assert "Shape" not in {n.op_type for n in onnx.load(str(eng.path)).graph.node}, name


def test_one_image_engine_fixes_the_batch_and_gives_the_same_predictions(sample_images):
    """The viewer's engine (max_batch=1) runs a session with the batch dimension fixed at 1, which lets ONNX Runtime
    fold TF "same" padding's shape arithmetic; its predictions must equal the batched engine's on real images."""
    from engines.imageio import load_rgb
    from engines.onnx_backend import OrtEngine
    from engines.select import default_model
    one, many = OrtEngine(default_model(), max_batch=1), OrtEngine(default_model(), max_batch=64)
    s = one.bundle.preprocess.size
    assert one.session.get_inputs()[0].shape == [1, 3, s, s]
    assert isinstance(many.session.get_inputs()[0].shape[0], str)
    images = [load_rgb(p) for p in sample_images]
    a, b = one.predict(images, tta="flip"), many.predict(images, tta="flip")
    assert np.allclose([x.probs for x in a], [x.probs for x in b], atol=1e-5)
    assert [x.melanoma_flag for x in a] == [x.melanoma_flag for x in b]


def test_cuda_sessions_are_asked_for_fp32_not_tf32():
    """ONNX Runtime's CUDA provider rounds FP32 convolutions to TF32 unless told not to; on an H200 that default
    flipped melanoma flags near the threshold. Every CUDA session gets the option; a CPU session, in the same form,
    still opens."""
    import onnxruntime as ort
    from engines.onnx_backend import PROVIDER_ALIASES, session_providers
    assert session_providers(PROVIDER_ALIASES["cuda"]) == [("CUDAExecutionProvider", {"use_tf32": "0"}),
                                                           "CPUExecutionProvider"]
    trt = session_providers(PROVIDER_ALIASES["ort-trt"])
    assert trt[0] == "TensorrtExecutionProvider" and trt[1][1]["use_tf32"] == "0"
    from engines.select import default_model
    sess = ort.InferenceSession(str(default_model()), providers=session_providers(PROVIDER_ALIASES["cpu"]))
    assert sess.get_providers() == ["CPUExecutionProvider"]


def test_dermbench_prints_every_figure(real_folder, tiny_onnx):
    r = subprocess.run([sys.executable, "-m", "engines.bench", str(real_folder), "--model", str(tiny_onnx), "--limit",
                        "8", "--batch", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    import json
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["images"] == 8 and out["pure_images_per_s"] > 0 and out["scan_images_per_s"] > 0
    assert out["torch_eager_images_per_s"] is not None and out["torch_eager_images_per_s"] > 0
