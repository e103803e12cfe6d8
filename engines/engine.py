"""The one inference interface: RGB uint8 images in, calibrated class probabilities out."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from engines.bundle import ModelBundle
from engines.preprocess import flip_views, preprocess_batch


@dataclass(frozen=True)
class Prediction:
    probs: np.ndarray  # calibrated probabilities, one per class code, summing to 1
    label: str
    confidence: float
    melanoma_flag: bool  # mel_score at or above the model's operating threshold
    mel_score: float  # what the flag compares with the threshold (ModelBundle.mel_score; p(mel) in older bundles)
    cams: np.ndarray | None = None  # class activation maps, K x h x w, in logit units (what each place adds)

    def heat(self, class_index: int) -> np.ndarray | None:
        """The map of one class scaled to [0, 1], or all zeros when no place stands out (see normalize_cam)."""
        return None if self.cams is None else normalize_cam(self.cams[class_index])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Temperature-scaled softmax over classes, in float64 (training metrics and every backend share it)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


# A class activation map whose places differ by less than this many logits explains nothing in particular:
# min-max scaling would still paint a hot spot on it, so it is shown flat.
FLAT_CAM_LOGITS = 1.0


def normalize_cam(cam: np.ndarray, min_spread: float = FLAT_CAM_LOGITS) -> np.ndarray:
    lo, hi = float(cam.min()), float(cam.max())
    return ((cam - lo) / (hi - lo) if hi - lo >= min_spread else np.zeros_like(cam)).astype(np.float32)


class Engine(ABC):
    """A loaded model on one backend. Subclasses implement `run` on a preprocessed float32 batch."""

    bundle: ModelBundle
    backend: str  # e.g. "onnxruntime:CPUExecutionProvider", "tensorrt"
    max_batch: int = 64

    @abstractmethod
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """float32 N x 3 x S x S -> (logits N x K, cam N x K x h x w or None)."""

    def check_outputs(self, where: str) -> None:
        """Run one blank image: a graph whose logits are not N x classes, or not finite, is refused at load,
        before any result file is touched."""
        from engines.bundle import BundleError
        from engines.errors import one_line

        s = self.bundle.preprocess.size
        try:
            logits, cam = self.run(np.zeros((1, 3, s, s), np.float32))
        except Exception as e:  # noqa: BLE001 - any runtime failure on a valid input means an unusable model
            raise BundleError(f"{where}: the model fails on a {s}x{s} input ({one_line(e, 160)})") from None
        k = len(self.bundle.classes)
        if logits.shape != (1, k):
            raise BundleError(f"{where}: the model outputs logits of shape {tuple(logits.shape)}, expected (N, {k})")
        if not np.isfinite(logits).all():
            raise BundleError(f"{where}: the model outputs non-finite logits on a blank image")
        if cam is not None and (cam.ndim != 4 or cam.shape[:2] != (1, k)):
            raise BundleError(f"{where}: the model's CAM output has shape {tuple(cam.shape)}, expected (N, {k}, h, w)")

    def forward(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`run` over chunks of at most max_batch images."""
        outs = [self.run(batch[b:b + self.max_batch]) for b in range(0, len(batch), self.max_batch)]
        logits = np.concatenate([o[0] for o in outs])
        cam = np.concatenate([o[1] for o in outs]) if outs[0][1] is not None else None
        return logits, cam

    def logits(self, batch: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed batch -> (logits, CAM). `tta="flip"` averages the logits of the image and its
        horizontal, vertical and double flips."""
        logits, cam = self.forward(batch)
        if tta == "flip":
            flipped = flip_views(batch)[1:]
            logits = np.mean([logits] + [self.forward(np.ascontiguousarray(v))[0] for v in flipped], axis=0)
        return logits, cam

    def infer(self, batch: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed batch -> (calibrated probabilities, CAM), over the test-time views of `logits`."""
        logits, cam = self.logits(batch, tta)
        return softmax(logits, self.bundle.temperature).astype(np.float32), cam

    def predict(self, images: list[np.ndarray], tta: str = "none") -> list[Prediction]:
        """RGB uint8 images of any size -> one Prediction each."""
        if not images:
            return []
        probs, cam = self.infer(preprocess_batch(images, self.bundle.preprocess), tta)
        scores, thr = self.bundle.mel_score(probs), self.bundle.threshold_for(tta)
        return [self._prediction(probs[i], None if cam is None else cam[i], float(scores[i]), thr)
                for i in range(len(images))]

    def predict_one(self, image: np.ndarray) -> Prediction:
        return self.predict([image])[0]

    def _prediction(self, p: np.ndarray, cam: np.ndarray | None, score: float, threshold: float) -> Prediction:
        i = int(np.argmax(p))
        return Prediction(probs=p, label=self.bundle.classes[i], confidence=float(p[i]),
                          melanoma_flag=bool(score >= threshold), mel_score=score, cams=cam)

    def describe(self) -> str:
        return f"{self.bundle.model_name} @ {self.bundle.preprocess.size}px {self.bundle.precision} on {self.backend}"
