"""dermscan --ray on a local Ray instance (this machine's cores): the same CSV as the plain scan, and resume."""
import csv
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines.labels import CLASS_CODES

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
SCAN = [sys.executable, "-m", "engines.scan.cli"]


def rows_by_file(path: Path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len({r["file"] for r in rows}), "a file appears twice"
    return {r["file"]: r for r in rows}


def stop_ray() -> None:
    """A driver killed with -9 leaves its local Ray processes behind: end them."""
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, records):
    f = tmp_path_factory.mktemp("ray") / "images"
    (f / "sub").mkdir(parents=True)
    for i, r in enumerate(records[:200]):
        shutil.copy(r.path, (f / "sub" if i % 5 == 0 else f) / r.path.name)
    (f / "zero.jpg").write_bytes(b"")
    (f / "text.png").write_text("not an image")
    (f / "cut.jpg").write_bytes(records[0].path.read_bytes()[:400])
    return f


def test_ray_scan_equals_the_plain_scan(folder, tiny_onnx, tmp_path):
    plain, ray_csv = tmp_path / "plain.csv", tmp_path / "ray.csv"
    for out, extra in ((plain, []), (ray_csv, ["--ray"])):
        r = subprocess.run([*SCAN, str(folder), "--model", str(tiny_onnx), "--recursive", "--out", str(out),
                            "--batch", "16", "--quiet", *extra], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    a, b = rows_by_file(plain), rows_by_file(ray_csv)
    assert set(a) == set(b) and len(a) == 203
    for name, x in a.items():
        y = b[name]
        for col in ("status", "error", "label", "melanoma_flag", "width", "height"):
            assert x[col] == y[col], (name, col, x[col], y[col])
        if x["status"] == "ok":
            for c in (*CLASS_CODES, "confidence"):
                assert abs(float(x[c]) - float(y[c])) <= 1e-6, (name, c)
    assert sum(x["status"] == "error" for x in a.values()) == 3


def test_ray_scan_resumes_after_a_kill(folder, tiny_onnx, tmp_path):
    out = tmp_path / "r.csv"
    p = subprocess.Popen([*SCAN, str(folder), "--model", str(tiny_onnx), "--recursive", "--out", str(out),
                          "--batch", "4", "--ray", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or out.read_bytes().count(b"\r\n") < 30):
            time.sleep(0.05)
            if p.poll() is not None:
                break
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        stop_ray()
    before = rows_by_file(out)
    assert 0 < len(before) < 203
    r = subprocess.run([*SCAN, str(folder), "--model", str(tiny_onnx), "--recursive", "--out", str(out), "--batch",
                        "16", "--ray", "--resume", "--quiet"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    after = rows_by_file(out)
    assert len(after) == 203 and set(before) <= set(after)
