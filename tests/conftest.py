"""Shared fixtures: the real HAM10000 folder, a split manifest, and one tiny trained run reused by many tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def _data_dir() -> Path:
    env = os.environ.get("DERM_DATA")
    p = Path(env) if env else REPO.parent / "shared" / "data" / "ham10000"
    if not (p / "HAM10000_metadata.csv").is_file():
        pytest.fail(f"HAM10000 not found at {p}: set DERM_DATA to a HAM10000 folder", pytrace=False)
    return p


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _data_dir()


@pytest.fixture(scope="session")
def records(data_dir):
    from dermtrain.data import load_records
    return load_records(data_dir)


@pytest.fixture(scope="session")
def split_csv(records, tmp_path_factory) -> Path:
    from dermtrain.splits import make_split, write_manifest
    path = tmp_path_factory.mktemp("split") / "split.csv"
    write_manifest(make_split(records, seed=0), path)
    return path


TINY = dict(model="test_convnext", img_size=64, limit=140, batch_size=32, threads=1, seed=0,
            epochs_head=1, epochs_tune=1)


def tiny_config(**kw):
    from dermtrain.config import load_config, with_overrides
    return with_overrides(load_config("cpu"), **{**TINY, **kw})


@pytest.fixture(scope="session")
def tiny_run(data_dir, split_csv, tmp_path_factory) -> Path:
    """A test_convnext trained for 1 + 1 epochs on 140 real images per split, then evaluated on test."""
    from dermtrain.evaluate import evaluate
    from dermtrain.fit import fit
    out = tmp_path_factory.mktemp("runs") / "tiny"
    fit(tiny_config(), data_dir, split_csv, out, progress=False)
    evaluate(out, data_dir, "test", progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run, data_dir, tmp_path_factory) -> Path:
    """The tiny run converted: model.onnx (+ model.fp16.onnx, parity report), gated on 120 validation images."""
    from dermconvert.pipeline import convert
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    res = convert(tiny_run, out, fp16=True, data=data_dir, limit=120, log=lambda *_: None)
    assert res.onnx.is_file()
    return out


@pytest.fixture(scope="session")
def sample_images(records) -> list[Path]:
    """Twelve real HAM10000 images, at least one of every class."""
    from engines.labels import CLASS_CODES
    picked = []
    for c in CLASS_CODES:
        picked += [r.path for r in records if r.dx == c][:2]
    return picked[:14]


def pytest_collection_modifyitems(config, items):
    config._hostile = {k for item in items for m in item.iter_markers("hostile") for k in m.args}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    kinds = getattr(config, "_hostile", set())
    if kinds:
        terminalreporter.write_line(f"hostile dermscan inputs covered: {len(kinds)} kinds (tests/test_hostile_scan.py)")
