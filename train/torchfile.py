"""Reading a PyTorch checkpoint file with a one-line reason when it cannot be read.

torch.load fails on a text file, an empty file or a half-copied checkpoint with whatever its unpickler hit first
(`KeyError: 101`, `EOFError`, `list index out of range`): true, but no help to the person holding the file. Each
reader of checkpoints (`--init`, `dermtrain eval`, `--resume`, the soup) goes through here and says what is wrong.
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from engines.errors import one_line


class CheckpointError(Exception):
    """A checkpoint file that cannot be read; str() is one line naming the file and the problem."""


def read_torch_file(path: Path, *, weights_only: bool) -> object:
    """torch.load(path) on the CPU. `weights_only` refuses pickled Python objects: use it for files from elsewhere."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - the unpickler fails in many ways; each becomes one reason
        raise CheckpointError(f"{path}: {_why_unreadable(path, e)}") from None


def read_run_checkpoint(path: Path) -> dict:
    """A dermtrain run's own checkpoint (best.pt, last.pt): its weights, config and what training recorded."""
    state = read_torch_file(path, weights_only=False)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "config" not in state:
        raise CheckpointError(f"{path}: not a dermtrain checkpoint (no model weights and config in it)")
    return state


def _why_unreadable(path: Path, error: Exception) -> str:
    if path.stat().st_size == 0:
        return "empty file, not a checkpoint"
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since PyTorch 1.6, with the directory at the end of the file.
        return "not a PyTorch checkpoint (no zip archive: another kind of file, or a copy cut short)"
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return "holds Python objects besides tensors; weights from outside a run are read as tensors only"
    return f"damaged PyTorch checkpoint ({one_line(error, 160)})"
