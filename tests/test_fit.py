import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dermtrain.fit import ResumeError, fit

pytestmark = pytest.mark.slow


def test_tiny_run_writes_every_artifact(tiny_run):
    for name in ("config.json", "run.json", "split.csv", "last.pt", "best.pt", "history.json", "metrics.json",
                 "report.md", "confusion_matrix.png", "training_curves.png", "calibration.json"):
        assert (tiny_run / name).is_file() and (tiny_run / name).stat().st_size > 0, name
    run = json.loads((tiny_run / "run.json").read_text())
    assert len(run["split_sha256"]) == 64 and run["code_version"]
    hist = json.loads((tiny_run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2] and [h["phase"] for h in hist] == [1, 2]
    assert (tiny_run / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_metrics_are_consistent(tiny_run):
    m = json.loads((tiny_run / "metrics.json").read_text())
    cm = np.array(m["confusion_matrix"])
    assert cm.sum() == m["n"]
    rec = np.diag(cm) / cm.sum(axis=1)
    assert abs(np.nanmean(rec) - m["balanced_accuracy"]) < 1e-9
    assert abs(np.trace(cm) / cm.sum() - m["accuracy"]) < 1e-9
    assert abs(m["per_class"]["mel"] - m["melanoma"]["argmax"]["recall"]) < 1e-9
    thr = m["melanoma"]["threshold"]
    assert 0.0 <= thr["threshold"] <= 1.0 and thr["threshold"] == m["operating_point"]["threshold"]
    assert m["operating_point"]["val_recall"] >= 0.9
    assert "Melanoma (mel)" in (tiny_run / "report.md").read_text()


def test_resume_continues_exactly(data_dir, split_csv, tmp_path):
    full = tmp_path / "full"
    fit(tiny_config(epochs_head=2, epochs_tune=1), data_dir, split_csv, full, progress=False)
    part = tmp_path / "part"
    fit(tiny_config(epochs_head=1, epochs_tune=0), data_dir, split_csv, part, progress=False)
    saved = torch.load(part / "last.pt", weights_only=False)
    assert saved["epoch"] == 1 and saved["optimizer"]["state"], "the optimizer state is checkpointed"
    with pytest.raises(ResumeError):
        fit(tiny_config(epochs_head=2, epochs_tune=1), data_dir, split_csv, part, progress=False)
    fit(tiny_config(epochs_head=2, epochs_tune=1), data_dir, split_csv, part, resume=True, progress=False)
    a = torch.load(full / "last.pt", weights_only=False)
    b = torch.load(part / "last.pt", weights_only=False)
    assert [h["epoch"] for h in b["history"]] == [1, 2, 3]
    for k in a["model"]:
        assert torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6), k


def test_continue_starts_a_run_then_resumes_it_and_a_finished_run_trains_nothing(data_dir, split_csv, tmp_path,
                                                                                 capsys):
    """`--continue` is what scripts that are run again after a stop pass: no run yet, it starts one; a stopped run, it
    resumes it; a finished run, it trains nothing. Without it a second `fit` into the folder still refuses."""
    from dermtrain.cli import main
    out = tmp_path / "run"
    args = ["fit", "--config", "cpu", "--model", "test_convnext", "--img-size", "64", "--limit", "48",
            "--batch-size", "16", "--epochs-tune", "0", "--threads", "1", "--data", str(data_dir),
            "--split", str(split_csv), "--out", str(out), "--quiet"]

    def epochs() -> list[int]:
        return [h["epoch"] for h in json.loads((out / "history.json").read_text())]

    assert main([*args, "--epochs-head", "1", "--continue"]) == 0 and epochs() == [1]
    assert main([*args, "--epochs-head", "2", "--continue"]) == 0 and epochs() == [1, 2]
    before = (out / "last.pt").read_bytes()
    assert main([*args, "--epochs-head", "2", "--continue"]) == 0 and epochs() == [1, 2]
    assert (out / "last.pt").read_bytes() == before
    capsys.readouterr()
    assert main([*args, "--epochs-head", "2"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_two_process_gloo_ddp_run(data_dir, split_csv, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "dermtrain.cli", "fit", "--config", "cpu", "--model", "test_convnext", "--img-size", "64",
           "--limit", "96", "--batch-size", "16", "--epochs-head", "1", "--epochs-tune", "0", "--threads", "1",
           "--data", str(data_dir), "--split", str(split_csv), "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "last.pt").is_file() and sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["epoch"] == 1
    assert json.loads((out / "run.json").read_text())["world_size"] == 2


def test_cli_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dermtrain.cli", "check-data", "--data", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
