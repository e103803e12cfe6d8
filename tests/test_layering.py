"""The runtime never pulls in the training stack, and nothing imports the viewer."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_engines_and_viewer_do_not_import_torch():
    code = ("import sys; import engines, engines.select, engines.onnx_backend, engines.tensorrt_backend, "
            "engines.scan.cli, engines.scan.report_html, engines.bench, dermviewer.app; "
            "bad = [m for m in ('torch', 'timm', 'torchvision', 'dermtrain', 'dermconvert') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"QT_QPA_PLATFORM": "offscreen", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stdout + r.stderr


def test_dependencies_point_one_way():
    import re

    def imported(folder: str) -> set[str]:
        # module-level imports; dermbench imports torch lazily, only for its PyTorch baseline
        pat = re.compile(r"^(?:from|import)\s+(\w+)", re.M)
        return {m for p in (REPO / folder).rglob("*.py") for m in pat.findall(p.read_text())}
    assert "dermviewer" not in imported("engines") | imported("train") | imported("convert")
    assert "dermconvert" not in imported("engines") | imported("train")
    assert not {"dermtrain", "torch"} & imported("engines")
    assert "engines" in imported("train") and "dermtrain" in imported("convert")
