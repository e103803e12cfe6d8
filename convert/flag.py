"""The melanoma flag of a bundle: its own score's offsets and thresholds, chosen on validation.

`with_flag` is what an ensemble's calibration ends with; `dermconvert flag MODEL.onnx` gives a bundle converted
before the flag had its own score (or one whose run folder is gone) the same choice, from the bundle as it runs."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from engines.bundle import ModelBundle
from engines.fsutil import atomic_path


def with_flag(bundle: ModelBundle, val_logits: dict[str, np.ndarray], labels: np.ndarray, log_prior: np.ndarray,
              target_sensitivity: float = 0.90) -> ModelBundle:
    """The bundle with its melanoma flag chosen at its own temperature: the offsets on the plain validation logits,
    a threshold per test-time-view setting in `val_logits`, and the headline validation figures."""
    from dermtrain.evaluate import validation_figures
    from dermtrain.metrics import choose_flag, flag_threshold, summarize

    t = bundle.temperature
    flag = choose_flag(val_logits["none"], labels, t, log_prior, target_sensitivity)
    thr = {tta: flag_threshold(v, labels, t, flag.offsets, target_sensitivity)
           for tta, v in val_logits.items() if tta != "none"}
    return replace(bundle, mel_threshold=flag.threshold, mel_thresholds=thr, mel_flag_offsets=flag.offsets,
                   validation=validation_figures(summarize(val_logits["none"], labels, t, flag.threshold,
                                                           flag.offsets)))


def flag_bundle(model: Path, data: Path, split: Path, out: Path | None = None, limit: int | None = None,
                log=print) -> ModelBundle:
    """`dermconvert flag`: choose the bundle's melanoma flag on the validation images of its own split, and write
    the bundle again (in place unless `out`) with only its metadata changed; returns the new bundle."""
    import onnx

    from dermconvert.export import set_metadata
    from dermconvert.pipeline import validation_batch
    from dermtrain.evaluate import check_bundle_split
    from dermtrain.fit import split_log_prior
    from engines.onnx_backend import OrtEngine

    eng = OrtEngine(model, "cpu")
    old = eng.bundle
    check_bundle_split(old, split, model.name, required=True)  # the flag is chosen on its own validation images
    x, labels = validation_batch(data, split, old.preprocess, limit)
    tta_settings = ["none", *sorted({"flip", *old.mel_thresholds})]  # every setting gets a threshold of its own
    log(f"{model}: scoring {len(labels)} validation images ({', '.join(tta_settings)})")
    val = {tta: eng.logits(x, tta)[0] for tta in tta_settings}
    new = with_flag(old, val, labels, split_log_prior(data, split, limit))
    proto = onnx.load(str(model))
    set_metadata(proto, new)
    out = out or model
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))
    v_old, v_new = old.validation, new.validation
    log(f"wrote {out}: melanoma flag offsets {[round(o, 3) for o in new.mel_flag_offsets] or 'none (p(mel))'}, "
        f"threshold {new.mel_threshold:.4f}; validation melanoma recall / specificity at the flag "
        f"{v_new['mel_recall_at_threshold']:.2%} / {v_new['mel_specificity_at_threshold']:.2%} "
        f"(before: {v_old.get('mel_recall_at_threshold', float('nan')):.2%} / "
        f"{v_old.get('mel_specificity_at_threshold', float('nan')):.2%})")
    return new
