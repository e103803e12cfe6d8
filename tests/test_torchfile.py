"""Unreadable checkpoint files get one line naming the file and the problem, wherever they are read."""
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from dermtrain.models import InitError, _read_checkpoint
from dermtrain.torchfile import CheckpointError, read_run_checkpoint, read_torch_file


def _bad_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": OrderedDict(w=torch.ones(64, 64)), "config": {}}, good)
    raw = good.read_bytes()
    files = {"empty.pt": b"", "notes.pt": b"these are notes, saved with a .pt name\n",
             "half.pt": raw[: len(raw) // 2]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return good, {name: tmp_path / name for name in files}


@pytest.mark.parametrize("weights_only", [True, False])
def test_each_unreadable_file_gets_its_reason(tmp_path, weights_only):
    good, bad = _bad_files(tmp_path)
    assert torch.equal(read_torch_file(good, weights_only=weights_only)["model"]["w"], torch.ones(64, 64))
    reasons = {"empty.pt": "empty file", "notes.pt": "not a PyTorch checkpoint", "half.pt": "not a PyTorch checkpoint"}
    for name, path in bad.items():
        with pytest.raises(CheckpointError) as e:
            read_torch_file(path, weights_only=weights_only)
        msg = str(e.value)
        assert msg.startswith(str(path)) and reasons[name] in msg and "\n" not in msg, msg
    with pytest.raises(CheckpointError, match="not found"):
        read_torch_file(tmp_path / "missing.pt", weights_only=weights_only)


def test_a_run_checkpoint_needs_its_weights_and_config(tmp_path):
    good, _ = _bad_files(tmp_path)
    assert set(read_run_checkpoint(good)) == {"model", "config"}
    plain = tmp_path / "state_dict.pt"
    torch.save(OrderedDict(w=torch.ones(2)), plain)
    with pytest.raises(CheckpointError, match="not a dermtrain checkpoint"):
        read_run_checkpoint(plain)


def test_python_objects_are_refused_by_name_for_outside_weights(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "note": object()}, path)
    with pytest.raises(InitError, match="Python objects besides tensors"):
        _read_checkpoint(path)
    assert "note" in read_torch_file(path, weights_only=False)  # a run's own checkpoint may hold them


def test_a_broken_safetensors_file_is_named(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_text("not tensors\n")
    with pytest.raises(InitError) as e:
        _read_checkpoint(path)
    assert str(e.value).startswith(f"{path}: not a readable safetensors file") and "\n" not in str(e.value)


def test_init_and_eval_say_it_in_one_line(tmp_path, data_dir, split_csv):
    _, bad = _bad_files(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(bad["half.pt"].read_bytes())
    commands = {  # what -> (arguments, the file the error must name)
        "eval": (["eval", str(run), "--data", str(data_dir), "--split", str(split_csv)], run / "best.pt"),
        "fit --init": (["fit", "--config", "cpu", "--model", "test_convnext", "--img-size", "64", "--limit", "32",
                      "--init", str(bad["notes.pt"]), "--data", str(data_dir), "--split", str(split_csv),
                      "--out", str(tmp_path / "out"), "--quiet"], bad["notes.pt"]),
    }
    for what, (args, named) in commands.items():
        r = subprocess.run([sys.executable, "-m", "dermtrain.cli", *args], capture_output=True, text=True, timeout=300)
        err = r.stderr.strip()
        assert r.returncode == 2 and err.count("\n") == 0, (what, r.stderr[-1500:])
        assert f"{named}: not a PyTorch checkpoint" in err, (what, err)
