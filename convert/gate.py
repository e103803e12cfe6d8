"""The accuracy gate: a reduced-precision model (FP16 / INT8 ONNX, a TensorRT engine) against the FP32 model it
came from, on real validation images. A failing gate ships nothing."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from dermtrain.metrics import balanced_accuracy, binary_rates, confusion, melanoma_at_argmax
from engines.engine import Engine
from engines.fsutil import sha256_file, sibling, write_json, write_text
from engines.labels import MEL_INDEX



@dataclass(frozen=True)
class GateLimits:
    min_top1_agreement: float
    max_balanced_acc_drop: float
    max_mel_recall_drop: float  # at the bundle's threshold and at argmax

    def describe(self) -> str:
        def points(x: float) -> str:
            return f"{100 * x:g} point" + ("" if round(100 * x, 6) == 1 else "s")

        return (f"top-1 agreement >= {self.min_top1_agreement:.1%}, balanced accuracy within "
                f"{points(self.max_balanced_acc_drop)}, melanoma recall within {points(self.max_mel_recall_drop)}")


DICT_LABELS = {"torch_parity": "PyTorch vs ONNX Runtime FP32"}
LIMITS = {"fp16": GateLimits(0.995, 0.005, 0.01), "int8": GateLimits(0.985, 0.01, 0.01)}


@dataclass
class GateResult:
    candidate: str
    n: int
    top1_agreement: float
    balanced_accuracy_fp32: float
    balanced_accuracy_fp16: float
    melanoma_recall_fp32: float  # at the bundle's operating threshold: the flag the clinic sees
    # (the *_fp16 fields hold the candidate's figures, whatever its precision: the report format predates INT8)
    melanoma_recall_fp16: float
    melanoma_recall_argmax_fp32: float
    melanoma_recall_argmax_fp16: float
    max_prob_diff: float
    passed: bool
    failures: list[str] = field(default_factory=list)
    limits: str = ""
    speed: dict = field(default_factory=dict)  # images/s of reference and candidate, where measured


def compare(reference: Engine, candidate: Engine, batch: np.ndarray, labels: np.ndarray, name: str,
            limits: GateLimits | None = None) -> GateResult:
    """Both engines on the same preprocessed images; the gate's verdict with the reasons it failed. The limits are
    those of the candidate's precision (its bundle metadata) unless given."""
    limits = limits or LIMITS.get(candidate.bundle.precision, LIMITS["fp16"])
    p32, _ = reference.infer(batch)
    p16, _ = candidate.infer(batch)
    ref = reference.bundle  # the reference's flag (score and threshold) judges both
    cm32, cm16 = confusion(labels, p32.argmax(1)), confusion(labels, p16.argmax(1))
    mel = labels == MEL_INDEX
    r = GateResult(
        candidate=name, n=len(labels),
        top1_agreement=float((p32.argmax(1) == p16.argmax(1)).mean()),
        balanced_accuracy_fp32=balanced_accuracy(cm32), balanced_accuracy_fp16=balanced_accuracy(cm16),
        melanoma_recall_fp32=binary_rates(ref.mel_score(p32), mel, ref.mel_threshold)["recall"],
        melanoma_recall_fp16=binary_rates(ref.mel_score(p16), mel, ref.mel_threshold)["recall"],
        melanoma_recall_argmax_fp32=melanoma_at_argmax(cm32)["recall"],
        melanoma_recall_argmax_fp16=melanoma_at_argmax(cm16)["recall"],
        max_prob_diff=float(np.abs(p32 - p16).max()), passed=False, limits=limits.describe())
    if r.top1_agreement < limits.min_top1_agreement:
        r.failures.append(f"top-1 agreement {r.top1_agreement:.2%} < {limits.min_top1_agreement:.1%}")
    if r.balanced_accuracy_fp32 - r.balanced_accuracy_fp16 > limits.max_balanced_acc_drop:
        r.failures.append(f"balanced accuracy drops {100 * (r.balanced_accuracy_fp32 - r.balanced_accuracy_fp16):.2f} points")
    for kind in ("", "_argmax"):
        drop = getattr(r, f"melanoma_recall{kind}_fp32") - getattr(r, f"melanoma_recall{kind}_fp16")
        if drop > limits.max_mel_recall_drop:
            r.failures.append(f"melanoma recall{kind.replace('_', ' at ')} drops {100 * drop:.2f} points")
    r.passed = not r.failures
    return r


def _prior_report(json_path: Path, digest: str) -> dict:
    """The report already written for this very FP32 file, its candidates as GateResults; an empty one when there
    is none, it belongs to another file, or it cannot be read back (edited by hand, cut short): a new one starts."""
    try:
        prior = json.loads(json_path.read_text()) if json_path.is_file() else {}
        if not isinstance(prior, dict) or prior.get("reference_sha256") != digest:
            return {"candidates": []}
        return {**prior, "candidates": [GateResult(**c) for c in prior.get("candidates", [])]}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return {"candidates": []}


def write_report(results: list[GateResult], reference: Path, extra: dict) -> Path:
    """REFERENCE.parity.json (the first candidate's figures at top level, every candidate under `candidates`) and .md.
    One report per FP32 file: a later `derive` or `verify` of the same file keeps what the conversion measured (its
    PyTorch parity, the candidates it does not gate again); a new FP32 file starts a new report."""
    json_path = sibling(reference, ".parity.json")
    digest = sha256_file(reference)
    prior = _prior_report(json_path, digest)
    gate_keys = {f.name for f in fields(GateResult)}
    by_name = {c.candidate: c for c in prior.pop("candidates")}
    by_name.update((r.candidate, r) for r in results)  # a candidate gated again keeps its place
    results = list(by_name.values())
    extra = {**{k: v for k, v in prior.items() if k not in gate_keys | {"candidates", "reference_sha256"}},
             **extra, "reference_sha256": digest}
    head = asdict(results[0]) if results else {}
    write_json(json_path, {**head, **extra, "passed": all(r.passed for r in results),
                           "candidates": [asdict(r) for r in results]})
    lines = ["# Conversion parity report", ""]
    for k, v in extra.items():
        if not isinstance(v, dict):
            lines.append(f"- {k}: {v}")
    for k, v in extra.items():
        if isinstance(v, dict):
            label = DICT_LABELS.get(k, k.replace("_", " "))
            lines += [f"- {label}, {kk}: {vv}" for kk, vv in v.items()]
    lines += ["", "| candidate | images | top-1 agreement | balanced acc FP32 / cand. | melanoma recall at threshold FP32 / cand. "
              "| melanoma recall at argmax FP32 / cand. | max prob diff | verdict |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.candidate} | {r.n} | {r.top1_agreement:.2%} | {r.balanced_accuracy_fp32:.4f} / "
                     f"{r.balanced_accuracy_fp16:.4f} | {r.melanoma_recall_fp32:.4f} / {r.melanoma_recall_fp16:.4f} | "
                     f"{r.melanoma_recall_argmax_fp32:.4f} / {r.melanoma_recall_argmax_fp16:.4f} | {r.max_prob_diff:.2e} | "
                     f"{'PASS' if r.passed else 'FAIL: ' + '; '.join(r.failures)} |")
    lines.append("")
    lines += [f"Gate for {r.candidate}: {r.limits}." for r in results]
    lines += [f"Speed of {r.candidate} on this machine: " + ", ".join(f"{k} {v}" for k, v in r.speed.items())
              for r in results if r.speed]
    lines.append("")
    write_text(json_path.with_suffix(".md"), "\n".join(lines))
    return json_path
