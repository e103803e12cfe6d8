"""The model bundle: one ONNX file whose metadata carries everything inference needs.

No preprocessing constant, class list, temperature or threshold lives anywhere else: training writes them
into the bundle at conversion time, and every backend reads them from here.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from engines.display import snap_threshold
from engines.labels import CLASS_CODES, CLASS_NAMES, MEL_INDEX
from engines.preprocess import PreprocessSpec

METADATA_KEY = "dermedge.bundle"
BUNDLE_VERSION = 2  # 2: mel_flag_offsets (a bundle without them is still written as, and reads as, version 1)


class BundleError(Exception):
    """A model file that is not a usable DermEdge bundle; str() is one line."""


@dataclass(frozen=True)
class ModelBundle:
    model_name: str
    preprocess: PreprocessSpec
    temperature: float = 1.0
    mel_threshold: float = 0.5  # on the melanoma score (`mel_score`) of the plain (single-view) prediction
    mel_thresholds: dict = field(default_factory=dict)  # test-time-view setting -> its own threshold ("flip": ...)
    # Added to the temperature-scaled logits for the melanoma flag alone (a share of the training log-prior, chosen
    # on validation): the label wants balanced logits, while melanomas rank better nearer the data's own prior.
    # Empty: the flag reads the bars' p(mel).
    mel_flag_offsets: tuple[float, ...] = ()
    classes: tuple[str, ...] = CLASS_CODES
    class_names: dict[str, str] = field(default_factory=lambda: dict(CLASS_NAMES))
    split_sha256: str = ""
    validation: dict = field(default_factory=dict)  # headline validation metrics of the source run
    has_cam: bool = False
    precision: str = "fp32"
    source: str = ""
    version: int = BUNDLE_VERSION

    @property
    def mel_index(self) -> int:
        return self.classes.index("mel")

    def mel_score(self, probs: np.ndarray) -> np.ndarray:
        """The score the melanoma flag compares with the threshold, from calibrated probabilities (N x K, or K):
        softmax(logits / T + offsets)[mel], which is p re-weighted by exp(offsets). Without offsets, p(mel)."""
        p = np.asarray(probs, np.float64)
        if not self.mel_flag_offsets:
            return p[..., self.mel_index]
        w = p * np.exp(np.asarray(self.mel_flag_offsets, np.float64))
        return w[..., self.mel_index] / w.sum(axis=-1)

    def mel_flags(self, probs: np.ndarray, tta: str = "none") -> np.ndarray:
        """Which predictions raise the melanoma flag: score at or above the threshold for `tta`."""
        return self.mel_score(probs) >= self.threshold_for(tta)

    def threshold_for(self, tta: str = "none") -> float:
        """The melanoma threshold chosen on validation for this test-time-view setting (averaging views shifts the
        probabilities, so each setting has its own). A bundle without one for `tta` falls back to the plain one."""
        return float(self.mel_thresholds.get(tta, self.mel_threshold)) if tta != "none" else self.mel_threshold

    def to_json(self) -> str:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        d["mel_flag_offsets"] = list(self.mel_flag_offsets)
        d["version"] = BUNDLE_VERSION
        if not self.mel_flag_offsets:  # nothing a version-1 runtime cannot read: keep the file readable by one
            del d["mel_flag_offsets"]
            d["version"] = 1
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "model") -> "ModelBundle":
        try:
            d = json.loads(text)
            version = int(d.get("version", 1))
            if version > BUNDLE_VERSION:  # before reading fields this runtime may not know
                raise BundleError(f"{where}: bundle version {version} is newer than this runtime ({BUNDLE_VERSION})")
            d["preprocess"] = PreprocessSpec.from_dict(d["preprocess"])
            d["classes"] = tuple(d["classes"])
            d["mel_flag_offsets"] = tuple(float(v) for v in d.get("mel_flag_offsets", ()))
            b = cls(**d)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise BundleError(f"{where}: DermEdge metadata is malformed ({e})") from None
        if b.classes != CLASS_CODES:
            raise BundleError(f"{where}: model classes {list(b.classes)} differ from {list(CLASS_CODES)}")
        b.validate(where)
        # Thresholds are whole hundredths of a percent, so the number shown is the number used (engines.display).
        return replace(b, mel_threshold=snap_threshold(b.mel_threshold),
                       mel_thresholds={k: snap_threshold(v) for k, v in b.mel_thresholds.items()})

    def validate(self, where: str) -> None:
        """Numbers that would silently give wrong results (a NaN threshold flags nothing; temperature 0 gives NaN
        probabilities) are refused at load."""
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise BundleError(f"{where}: temperature {self.temperature!r} in the model metadata is not a positive number")
        for name, t in [("mel_threshold", self.mel_threshold), *self.mel_thresholds.items()]:
            if not (isinstance(t, (int, float)) and math.isfinite(t) and 0.0 <= t <= 1.0):
                raise BundleError(f"{where}: melanoma threshold {name}={t!r} in the model metadata is not in [0, 1]")
        o = self.mel_flag_offsets
        if o and (len(o) != len(self.classes) or not all(math.isfinite(v) and abs(v) <= 50 for v in o)):
            raise BundleError(f"{where}: mel_flag_offsets {list(o)!r} in the model metadata are not "
                              f"{len(self.classes)} finite numbers within ±50")

    def metadata_props(self) -> dict[str, str]:
        return {METADATA_KEY: self.to_json()}


def from_metadata(props: dict[str, str], where: str) -> ModelBundle:
    if METADATA_KEY not in props:
        raise BundleError(f"{where}: not a DermEdge model (no {METADATA_KEY} metadata; convert it with dermconvert)")
    return ModelBundle.from_json(props[METADATA_KEY], where)


assert CLASS_CODES[MEL_INDEX] == "mel"
