"""Training augmentation on whole batches of cached uint8 images: flips, rotation, sharpness, colour jitter, JPEG.

Working on batches in the training process (one affine resample and a few tensor ops per batch) keeps
the loader off the critical path on a 2-core machine: no decode, no per-image Python, no worker processes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F


# Options added after banks and teacher targets were first cached: left out of the cache keys while off.
_ADDED_LATER = ("sharpness", "jpeg")


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True
    vflip: bool = True
    rotate_deg: float = 20.0
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.1
    # Blur or sharpen each view by a factor drawn in [1 - sharpness, 1 + sharpness] (factor 0: the image blurred by a
    # one-pixel Gaussian; factor 2: unsharp-masked by as much): another camera's optics, sharpening or resampling.
    # 0: off.
    sharpness: float = 0.0
    # Re-encode each view as a JPEG of a whole quality drawn in [jpeg, 99]: another archive's or camera's
    # compression. 0: off.
    jpeg: int = 0

    def key_dict(self) -> dict:
        """The fields that decide the views, for cache keys: a field added later is left out while it is off, so
        the banks and teacher targets cached before it keep their keys."""
        return {k: v for k, v in asdict(self).items() if v or k not in _ADDED_LATER}


def to_float_nchw(batch_u8: torch.Tensor) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float32 N x 3 x H x W in [0, 1]."""
    return batch_u8.permute(0, 3, 1, 2).float().div_(255.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate chroma in YIQ space by shift (fraction of the colour circle), per image."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    to_rgb = torch.linalg.inv(to_yiq)
    theta = shift * 2 * math.pi
    c, s = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(len(shift), 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = c, -s, s, c
    m = to_rgb @ rot @ to_yiq  # N x 3 x 3
    return torch.einsum("nij,njhw->nihw", m.to(x.device, x.dtype), x)


@dataclass(frozen=True)
class AugmentParams:
    """One draw of every random choice for N images. Geometry is in normalised coordinates, so the same
    parameters give the same view at any resolution: the bank's teachers and the student see one view."""
    angle: torch.Tensor  # radians, N
    sx: torch.Tensor  # -1 (horizontal flip) or 1
    sy: torch.Tensor  # -1 (vertical flip) or 1
    brightness: torch.Tensor  # factors, N
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # fraction of the colour circle
    sharpness: torch.Tensor  # factors, N: 1 leaves the image as it is
    jpeg: torch.Tensor  # JPEG qualities, N: 100 or above leaves the image as it is

    def take(self, idx) -> "AugmentParams":
        return AugmentParams(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))


def draw_params(n: int, cfg: AugmentConfig, g: torch.Generator) -> AugmentParams:
    angle = (torch.rand(n, generator=g) * 2 - 1) * math.radians(cfg.rotate_deg)
    sx = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n)
    sy = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if cfg.vflip else torch.ones(n)

    def factor(amount: float) -> torch.Tensor:
        return 1.0 + (torch.rand(n, generator=g) * 2 - 1) * amount if amount else torch.ones(n)

    b, c, s = factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation)
    hue = (torch.rand(n, generator=g) * 2 - 1) * cfg.hue if cfg.hue else torch.zeros(n)
    # Drawn last, in the order they were added: a config without them draws exactly the views it drew before.
    sharp = factor(cfg.sharpness)
    jpeg = (cfg.jpeg + torch.rand(n, generator=g) * (100 - cfg.jpeg)).floor() if cfg.jpeg else torch.full((n,), 100.0)
    return AugmentParams(angle, sx, sy, b, c, s, hue, sharp, jpeg)


def _gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Each channel blurred by a separable 5-tap Gaussian, edges reflected."""
    t = torch.arange(-2, 3, dtype=x.dtype, device=x.device)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).repeat(c, 1, 1, 1), groups=c)


def jpeg_roundtrip(rgb: np.ndarray, quality: int) -> np.ndarray:
    """An RGB uint8 image encoded and decoded as a JPEG (OpenCV's 4:2:0, as cameras write them) at that quality."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding at quality {quality} failed")
    return np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1])


def _jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """Each image with quality < 100 re-encoded as a JPEG at that quality."""
    out = x.clone()
    for i in torch.nonzero(quality < 100).flatten().tolist():
        rgb = (x[i].permute(1, 2, 0) * 255).round_().to(torch.uint8).cpu().numpy()
        back = jpeg_roundtrip(rgb, int(quality[i]))  # OpenCV: on the CPU, whatever device x is on
        out[i] = torch.from_numpy(back).to(x.device).permute(2, 0, 1).to(x.dtype) / 255.0
    return out


def apply_params(x: torch.Tensor, p: AugmentParams) -> torch.Tensor:
    """float N x 3 x H x W in [0, 1] -> the views the parameters describe, same shape, still in [0, 1]. x may be
    on any device (the parameters stay on the CPU, where the choices below read them); only the JPEG step runs on
    the CPU."""
    n = x.shape[0]
    col = lambda t: t.to(x.device, x.dtype).view(n, 1, 1, 1)  # noqa: E731
    if bool((p.angle != 0).any() or (p.sx != 1).any() or (p.sy != 1).any()):
        cos, sin = torch.cos(p.angle), torch.sin(p.angle)
        theta = torch.stack([torch.stack([cos * p.sx, -sin * p.sy, torch.zeros(n)], 1),
                             torch.stack([sin * p.sx, cos * p.sy, torch.zeros(n)], 1)], 1)
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        # Reflection keeps the skin texture at the corners instead of black wedges the model could learn.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if bool((p.sharpness != 1).any()):
        blurred = _gaussian_blur(x)
        x = blurred + (x - blurred) * col(p.sharpness)
    x = x * col(p.brightness)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = (x - mean) * col(p.contrast) + mean
    gray = _gray(x)
    x = (x - gray) * col(p.saturation) + gray
    if bool((p.hue != 0).any()):
        x = _hue_shift(x, p.hue)
    x = x.clamp_(0.0, 1.0)
    # Last, as in a camera or an archive: the compression sees the image as it would be stored.
    return _jpeg(x, p.jpeg) if bool((p.jpeg < 100).any()) else x


def augment(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """float N x 3 x H x W in [0, 1] -> augmented, same shape, still in [0, 1]."""
    return apply_params(x, draw_params(x.shape[0], cfg, g))


def draw_dihedral(n: int) -> torch.Tensor:
    """3 x N bits from torch's global generator: for each image of a batch one of the 8 symmetries of the square
    (a horizontal flip, a vertical flip and, when H == W, a transpose, each with probability 1/2). A dermoscopy
    image has no up, down or handedness, so a teacher's target for a view holds for its mirror images too: a
    student trained on K fixed views sees up to 8K distinct inputs per image."""
    return torch.randint(0, 2, (3, n)).bool()


def apply_dihedral(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The symmetries `bits` (from draw_dihedral) applied to a batch of images or of feature maps alike, so that a
    teacher's spatial features follow the student's view. The transpose applies only when H == W."""
    b = bits.to(x.device).view(3, -1, 1, 1, 1)
    x = torch.where(b[0], x.flip(3), x)
    x = torch.where(b[1], x.flip(2), x)
    if x.shape[2] == x.shape[3]:
        x = torch.where(b[2], x.transpose(2, 3), x)
    return x


@dataclass(frozen=True)
class Mix:
    """A batch mixed with a permutation of itself, and its loss the same blend of the two images' losses.

    Mixup (box None): input i becomes lam * x[i] + (1 - lam) * x[partner[i]].
    CutMix (box = top, left, height, width): the box of input i is replaced by the same box of x[partner[i]], and
    lam is the share of the area left to x[i].
    lam >= 0.5 either way, so each input's own label stays the larger."""
    partner: torch.Tensor
    lam: float
    box: tuple[int, int, int, int] | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.box is None:
            return x * self.lam + x[self.partner.to(x.device)] * (1 - self.lam)
        t, left, h, w = self.box
        out = x.clone()
        out[:, :, t:t + h, left:left + w] = x[self.partner.to(x.device), :, t:t + h, left:left + w]
        return out


def _own_share(alpha: float) -> float:
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    return max(lam, 1 - lam)


def draw_mix(n: int, alpha: float) -> Mix:
    """One mixing weight per batch from Beta(alpha, alpha) and a random pairing, from torch's global generator. It
    mixes images and feature maps alike: on a bank, the frozen stages' outputs of two views."""
    lam = _own_share(alpha)  # drawn before the pairing: the order of draws is part of a run's reproducibility
    return Mix(torch.randperm(n), lam)


def draw_cutmix(n: int, alpha: float, height: int, width: int) -> Mix:
    """CutMix: a box of about (1 - lam) of the area, lam from Beta(alpha, alpha), placed uniformly inside the map,
    and lam then set to the area actually kept. On a bank it pastes a region of another view's feature map."""
    lam = _own_share(alpha)
    h = min(height, round(height * math.sqrt(1 - lam)))
    w = min(width, round(width * math.sqrt(1 - lam)))
    t = int(torch.randint(height - h + 1, ()))
    left = int(torch.randint(width - w + 1, ()))
    return Mix(torch.randperm(n), 1 - h * w / (height * width), (t, left, h, w))


def draw_batch_mix(n: int, mixup: float, cutmix: float, height: int, width: int) -> Mix | None:
    """The recipe's mixing for one batch: mixup, CutMix, or (both alphas > 0) either with probability 1/2, as in
    timm's Mixup; None when both are off."""
    if mixup and cutmix:
        use_cutmix = bool(torch.rand(()) < 0.5)
    elif mixup or cutmix:
        use_cutmix = bool(cutmix)
    else:
        return None
    return draw_cutmix(n, cutmix, height, width) if use_cutmix else draw_mix(n, mixup)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s
