"""`dermtrain eval`: the clinical evaluation of a run on one split, written into the run folder."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dermtrain.cache import build_cache
from dermtrain.config import from_dict
from dermtrain.data import load_records
from dermtrain.fit import RunFiles, predict_logits, train_log_prior, training_curves_png
from dermtrain.metrics import (FlagChoice, choose_flag, expected_calibration_error, fit_temperature, flag_threshold,
                               softmax, summarize)
from dermtrain.models import create_model
from dermtrain.plots import confusion_matrix_png
from dermtrain.splits import manifest_sha256, read_manifest, select
from dermtrain.torchfile import CheckpointError, read_run_checkpoint
from engines.fsutil import atomic_path, write_json, write_text
from engines.labels import class_name
from engines.preprocess import PreprocessSpec, flip_views


class EvalError(Exception):
    """A run that cannot be evaluated; str() is one line."""


def load_checkpoint(run_dir: Path, which: str = "best") -> dict:
    """The checkpoint dict `which`.pt of a run folder."""
    path = Path(run_dir) / f"{which}.pt"
    if not path.is_file():
        raise EvalError(f"{path}: checkpoint not found (has the run finished an epoch?)")
    try:
        return read_run_checkpoint(path)
    except CheckpointError as e:
        raise EvalError(str(e)) from None


def load_run_model(run_dir: Path, which: str = "best"):
    """(model in eval mode, TrainConfig, PreprocessSpec, checkpoint dict) of a run folder."""
    state = load_checkpoint(run_dir, which)
    cfg = from_dict(state["config"])
    spec = PreprocessSpec.from_dict(state["preprocess"])
    model = create_model(cfg.model, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    model.load_state_dict(state["model"])
    return model.eval(), cfg, spec, state


def tta_logits(model, images_u8: np.ndarray, spec: PreprocessSpec, tta: str, batch: int = 128) -> np.ndarray:
    """Mean logits over the test-time views: none, or `flip` (identity, horizontal, vertical, both)."""
    dev = torch.device("cpu")
    views = flip_views(images_u8, h_axis=1, w_axis=2) if tta == "flip" else [images_u8]
    outs = [predict_logits(model.to(memory_format=torch.channels_last), np.ascontiguousarray(v), spec, dev, batch,
                           None, True) for v in views]  # channels-last: depthwise convolutions run ~2x faster
    return np.mean(outs, axis=0)


def evaluate(run_dir: Path, data_dir: Path, split_name: str = "test", target_sensitivity: float = 0.90,
             tta: str = "none", limit: int | None = None, progress: bool = True) -> dict:
    run = RunFiles(Path(run_dir))
    model, cfg, spec, state = load_run_model(run.root)
    if not run.split.is_file():
        raise EvalError(f"{run.split}: the run's split manifest is missing")
    if manifest_sha256(run.split) != state["split_sha256"]:
        raise EvalError(f"{run.split}: differs from the manifest the model was trained on")
    rows = read_manifest(run.split)
    records = load_records(data_dir)
    lim = limit if limit is not None else cfg.limit
    val_recs = select(rows, records, "val", lim, cfg.seed)
    eval_recs = select(rows, records, split_name, lim, cfg.seed)
    val_x, val_y = build_cache(val_recs, spec, "caching val", progress)
    x, y = build_cache(eval_recs, spec, f"caching {split_name}", progress)
    torch.set_num_threads(cfg.threads or torch.get_num_threads())
    val_logits = tta_logits(model, val_x, spec, tta, cfg.eval_batch_size)
    logits = tta_logits(model, x, spec, tta, cfg.eval_batch_size)

    # The shipped temperature and melanoma-flag offsets are the plain ones; a test-time-view setting keeps them and
    # gets its own threshold.
    cal_path = run.root / "calibration.json"
    cal = json.loads(cal_path.read_text()) if tta != "none" and cal_path.is_file() else None
    if cal:
        temperature, offsets = float(cal["temperature"]), tuple(cal.get("mel_flag_offsets", ()))
        threshold = flag_threshold(val_logits, val_y, temperature, offsets, target_sensitivity)
        flag = FlagChoice(float(cal.get("mel_flag_shift", 0.0)), offsets, threshold, ())
    else:
        temperature = fit_temperature(val_logits, val_y)
        log_prior = train_log_prior(rows, records, lim, cfg.seed)
        flag = choose_flag(val_logits, val_y, temperature, log_prior, target_sensitivity)
    scores = Scores(val_logits, val_y, logits, y)
    metrics = clinical_metrics(scores, temperature, flag, target_sensitivity,
                               {"run": str(run.root), "split": split_name, "checkpoint_epoch": state["epoch"],
                                "model": cfg.model, "img_size": spec.size, "tta": tta,
                                "split_sha256": state["split_sha256"]})
    if tta == "none":
        old = json.loads(cal_path.read_text()) if cal_path.is_file() else {}
        same = old.get("temperature") == temperature and old.get("mel_flag_offsets", []) == list(flag.offsets)
        write_json(cal_path, {"temperature": temperature, "mel_threshold": flag.threshold,
                              "mel_thresholds": old.get("mel_thresholds", {}) if same else {},
                              "mel_flag_shift": flag.shift, "mel_flag_offsets": list(flag.offsets),
                              "mel_flag_grid": list(flag.grid), "target_sensitivity": target_sensitivity,
                              "validation": metrics["validation"]})
    elif cal is not None:
        write_json(cal_path, {**cal, "mel_thresholds": {**cal.get("mel_thresholds", {}), tta: flag.threshold}})
    write_evaluation(run.root, metrics, scores, f"{cfg.model} @ {spec.size}px, {split_name} split")
    history = json.loads(run.history.read_text()) if run.history.is_file() else state.get("history")
    if history:  # the whole run, not just up to the best checkpoint
        training_curves_png(history, cfg.phase1.epochs, run.curves)
    return metrics


@dataclass(frozen=True)
class Scores:
    """Logits and labels of the validation split (where operating points are chosen) and of the evaluated one."""
    val_logits: np.ndarray
    val_labels: np.ndarray
    logits: np.ndarray
    labels: np.ndarray


def clinical_metrics(s: Scores, temperature: float, flag: FlagChoice, target_sensitivity: float, header: dict) -> dict:
    """metrics.json: every headline figure of the evaluated split at this temperature and melanoma flag,
    and the flag's figures on validation."""
    val_sum = summarize(s.val_logits, s.val_labels, temperature, flag.threshold, flag.offsets)
    m = summarize(s.logits, s.labels, temperature, flag.threshold, flag.offsets)
    return {
        **header,
        **{k: m[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1", "per_class", "auc", "class_table",
                             "confusion_matrix", "melanoma")},
        "calibration": {"temperature": temperature,
                        "ece_before": expected_calibration_error(softmax(s.logits), s.labels),
                        "ece_after": m["ece"]},
        "operating_point": {"class": "mel", "threshold": flag.threshold, "target_sensitivity": target_sensitivity,
                            "flag_shift": flag.shift, "flag_offsets": list(flag.offsets),
                            "chosen_on": "val", "val_recall": val_sum["melanoma"]["threshold"]["recall"],
                            "val_specificity": val_sum["melanoma"]["threshold"]["specificity"]},
        "validation": validation_figures(val_sum),
    }


def validation_figures(val_sum: dict) -> dict:
    """The headline validation figures a run's calibration and a bundle's metadata carry, from `summarize`."""
    return ({k: val_sum[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_f1")}
            | {"mel_recall": val_sum["per_class"]["mel"],
               "mel_recall_at_threshold": val_sum["melanoma"]["threshold"]["recall"],
               "mel_specificity_at_threshold": val_sum["melanoma"]["threshold"]["specificity"]})


def write_evaluation(root: Path, metrics: dict, s: Scores, title: str) -> None:
    """metrics{_tta}.json (and metrics_SPLIT{_tta}.json beside a non-test one), the logits, the confusion matrix
    and report{_tta}.md. Test-time-augmented evaluations sit beside the plain one instead of replacing it."""
    split_name, tta = metrics["split"], metrics["tta"]
    tag = "" if tta == "none" else f"_{tta}"
    write_json(root / f"metrics{tag}.json", metrics)
    if split_name != "test":
        write_json(root / f"metrics_{split_name}{tag}.json", metrics)
    with atomic_path(root / f"logits_{split_name}{tag}.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, logits=s.logits, labels=s.labels, val_logits=s.val_logits, val_labels=s.val_labels)
    confusion_matrix_png(np.array(metrics["confusion_matrix"]), root / f"confusion_matrix{tag}.png",
                         f"{title} (n={metrics['n']}){', TTA ' + tta if tag else ''}")
    write_text(root / f"report{tag}.md", render_report(metrics, tag))


def check_bundle_split(b, split_csv: Path, model_name: str, required: bool = False) -> None:
    """Refuse (EvalError, one line) a manifest other than the one the bundle was trained on: its validation or test
    images could be training images. `required`: a bundle that records no manifest is refused too."""
    if not split_csv.is_file():
        raise EvalError(f"{split_csv}: split manifest not found")
    if required and not b.split_sha256:
        raise EvalError(f"{model_name}: records no split manifest, so its validation images are unknown")
    if b.split_sha256 and manifest_sha256(split_csv) != b.split_sha256:
        raise EvalError(f"{split_csv}: not the manifest {model_name} was trained on (its sha256 is "
                        f"{b.split_sha256[:12]}…): its validation or test images could be training images")


def evaluate_bundle(onnx_path: Path, data_dir: Path, split_csv: Path, out_dir: Path, split_name: str = "test",
                    tta: str = "none", limit: int | None = None, progress: bool = True) -> dict:
    """`dermtrain eval MODEL.onnx --split S --out DIR`: a shipped bundle as it runs, its own temperature and
    melanoma threshold for `tta` (nothing refitted), on one split; the same files as a run's evaluation, in DIR."""
    from engines.bundle import BundleError
    from engines.onnx_backend import OrtEngine
    from engines.preprocess import normalize

    try:
        eng = OrtEngine(onnx_path, "cpu")
    except BundleError as e:
        raise EvalError(str(e)) from None
    b = eng.bundle
    check_bundle_split(b, split_csv, onnx_path.name)
    rows, records = read_manifest(split_csv), load_records(data_dir)

    def scored(name: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = build_cache(select(rows, records, name, limit, 0), b.preprocess, f"caching {name}", progress)
        logits = [eng.logits(normalize(x[i:i + 64], b.preprocess), tta)[0] for i in range(0, len(x), 64)]
        return np.concatenate(logits) if logits else np.zeros((0, len(b.classes)), np.float32), y

    val_logits, val_y = scored("val")
    logits, y = scored(split_name)
    scores = Scores(val_logits, val_y, logits, y)
    flag = FlagChoice(None, b.mel_flag_offsets, b.threshold_for(tta), ())  # the bundle's own: nothing refitted
    metrics = clinical_metrics(scores, b.temperature, flag, 0.90,
                               {"run": str(onnx_path), "split": split_name, "checkpoint_epoch": None,
                                "model": b.model_name, "img_size": b.preprocess.size, "tta": tta,
                                "split_sha256": b.split_sha256, "precision": b.precision})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_evaluation(out_dir, metrics, scores, f"{onnx_path.name}, {split_name} split")
    return metrics


def _pct(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def flag_score_words(op: dict) -> str:
    """What the flag's score is, in the words of a report."""
    if not op.get("flag_offsets"):
        return "the calibrated p(mel) the bars show"
    if op.get("flag_shift") is None:
        return "p(mel) re-weighted by the bundle's flag offsets"
    return f"p(mel) after a further {op['flag_shift']:g} x the training log-prior (chosen on validation)"


def render_report(m: dict, tag: str = "") -> str:
    mel_a, mel_t = m["melanoma"]["argmax"], m["melanoma"]["threshold"]
    epoch = m["checkpoint_epoch"]  # None: a bundle; a string: a soup of runs (dermtrain.soup)
    lines = [
        f"# Evaluation: {m['model']} @ {m['img_size']} px on the {m['split']} split",
        "",
        (f"Run `{m['run']}`, " + (f"checkpoint of epoch {epoch}" if isinstance(epoch, int) else str(epoch))
         if epoch is not None else
         f"Bundle `{m['run']}` ({m.get('precision', 'fp32')}) as it runs, with its own temperature and threshold")
        + f", {m['n']} images, test-time views: {m['tta']}. "
        f"Split manifest sha256 `{m['split_sha256'][:12]}…` (lesion-level, no lesion in two splits).",
        "",
        "| metric | value |", "|---|---|",
        f"| overall accuracy | {_pct(m['accuracy'])} |",
        f"| balanced accuracy (mean recall) | {_pct(m['balanced_accuracy'])} |",
        f"| macro F1 | {_pct(m['macro_f1'])} |",
        f"| melanoma recall / specificity at argmax | {_pct(mel_a['recall'])} / {_pct(mel_a['specificity'])} |",
        f"| melanoma recall / specificity at the flag (score >= {mel_t['threshold']:.4f}) | "
        f"{_pct(mel_t['recall'])} / {_pct(mel_t['specificity'])} |",
        f"| ECE before / after temperature {m['calibration']['temperature']:.3f} | "
        f"{_pct(m['calibration']['ece_before'])} / {_pct(m['calibration']['ece_after'])} |",
        "",
        "## Per class",
        "",
        "| Class | Correct / Total | Accuracy | Most Common Confusion | AUC (one-vs-rest) |",
        "|---|---|---|---|---|",
    ]
    for r in m["class_table"]:
        conf = (f"{class_name(r['confused_with'])} ({r['confused_count']}, {_pct(r['confused_share'])})"
                if r["confused_with"] else "none")
        lines.append(f"| {r['name']} ({r['code']}) | {r['correct']} / {r['total']} | {_pct(r['accuracy'])} | "
                     f"{conf} | {m['auc'][r['code']]:.3f} |")
    op = m["operating_point"]
    lines += [
        "",
        "## Melanoma operating point",
        "",
        f"The melanoma flag compares its score, {flag_score_words(op)}, with a threshold chosen on the validation "
        f"split for at least {_pct(op['target_sensitivity'])} melanoma sensitivity: t = {op['threshold']:.4f} "
        f"(validation recall {_pct(op['val_recall'])}, specificity {_pct(op['val_specificity'])}). "
        f"On this split it catches {mel_t['tp']} of {mel_t['tp'] + mel_t['fn']} melanomas and flags "
        f"{mel_t['fp']} of {mel_t['fp'] + mel_t['tn']} non-melanomas.",
        "",
        f"![confusion matrix](confusion_matrix{tag}.png)",
        "",
        *(["![training curves](training_curves.png)", ""] if isinstance(epoch, int) else []),
        "Decision support, not a diagnosis.",
        "",
    ]
    return "\n".join(lines)
