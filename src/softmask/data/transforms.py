"""Batched image transforms on the training device (kornia): ALBEF's training augmentation and the
evaluation resize, both ending in CLIP-statistics normalisation (which ALBEF uses).

Inputs are the loaders' uint8 ``(B, 3, S, S)`` tensors, on any device. All randomness comes from
torch's global CPU generator (kornia draws its parameters there and moves them to the input's
device; :class:`TrainAugment` keeps it so even after ``.to(device)``), so saving and restoring
``torch.get_rng_state()`` reproduces an augmentation exactly, and the same seed draws the same crops,
flips and operations on CPU and GPU.

ALBEF's RandAugment and how :class:`AlbefRandAugment` matches it. ALBEF draws ``n`` operations per
image, with replacement, from: identity, autocontrast, equalize, brightness, sharpness, shear x/y,
translate x/y and rotate, applies each with probability 0.5, at a magnitude ``level / 10`` of each
operation's maximum (brightness and sharpness factor 0.1-1.9; shear factor 0.3, random sign;
translation 10 pixels, random sign; rotation 30 degrees, random sign; fill grey 128). Here:

- the same ten operations, through kornia's policy customisation, with ``identity`` added by our
  subclass (kornia's policies have no identity operation); each applied per image with probability
  0.5; the ``n`` operations are drawn with replacement, like ALBEF;
- ``data.augment.randaug_magnitude`` is on ALBEF's 0-10 scale (default 7, as ALBEF); kornia's ``m``
  is three times it, on kornia's 0-30 scale, where the ranges below put ALBEF's maximum (level 10) at
  ``m = 30``; ``m`` is clamped into kornia's open interval (0, 30);
- brightness multiplies by its factor, as ALBEF's and PIL's (kornia's own operation adds ``factor - 1``,
  which at magnitude 7 shifts every channel by up to 0.63 and turns a saturated colour black or white:
  measured to stop a model from learning colour words, see docs/results.md), and autocontrast leaves a
  constant channel as it is, as ALBEF's (kornia's maps it to 0); both are our operations below;
- shear, translation and rotation fill the uncovered area with grey (0.5, ALBEF's 128), not kornia's
  black: a black border makes a following autocontrast or equalize stretch every channel of the image
  from 0, which turns colours white;
- differences that remain: the operations are chosen once per batch (kornia), not per image, though
  the 0.5 gates and signs are drawn per image; the translation is a fraction of the side (10/256,
  ALBEF's 10 pixels at 256 px); shear is an angle (``atan(0.3)`` at the maximum) rather than a factor;
  the operations run on the float crop in [0, 1], not on a PIL image.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment
from kornia.augmentation.auto.operations import (
    Equalize,
    OperationBase,
    Rotate,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
)
from kornia.augmentation.auto.operations.policy import PolicySequential
from kornia.augmentation.base import _BasicAugmentationBase
from kornia.enhance import adjust_brightness_accumulative
from torch import nn
from torch.nn import functional as F

from softmask.config import AugmentConfig, ConfigError
from softmask.config.choices import RANDAUG_OPERATIONS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ALBEF_OP_PROBABILITY = 0.5
_SHEAR = math.atan(0.3) / math.pi  # kornia multiplies shear magnitudes by 180 (degrees): atan(0.3) rad at m = 30
_TRANSLATE = 10 / 256  # ALBEF: 10 px at level 10 on 256 px images

# (name, low, high) at kornia's m = 0 and m = 30; symmetric operations take (-max, max)
ALBEF_POLICY = [
    [("identity", 0.0, 0.0)],
    [("auto_contrast", 0.0, 1.0)],
    [("equalize", 0.0, 1.0)],
    [("brightness", 0.1, 1.9)],
    [("sharpness", 0.1, 1.9)],
    [("shear_x", -_SHEAR, _SHEAR)],
    [("shear_y", -_SHEAR, _SHEAR)],
    [("translate_x", -_TRANSLATE, _TRANSLATE)],
    [("translate_y", -_TRANSLATE, _TRANSLATE)],
    [("rotate", -30.0, 30.0)],
]
if tuple(sub[0][0] for sub in ALBEF_POLICY) != RANDAUG_OPERATIONS:  # the config validates against the names
    raise ImportError("ALBEF_POLICY and softmask.config.RANDAUG_OPERATIONS list different operations")


def albef_policy(exclude: list[str] | tuple[str, ...] = ()) -> list:
    """ALBEF's RandAugment operations without those named in ``exclude``."""
    return [sub for sub in ALBEF_POLICY if sub[0][0] not in set(exclude)]


class _MultiplyBrightness(K.RandomBrightness):
    """Brightness as ALBEF and PIL define it: the image times the factor (kornia's adds factor - 1)."""

    def apply_transform(self, input, params, flags, transform=None):  # noqa: A002 (kornia's signature)
        return adjust_brightness_accumulative(input, params["brightness_factor"].to(input), clip_output=True)


class _AlbefAutoContrast(K.RandomAutoContrast):
    """Per-channel min-max stretch to [0, 1]; a constant channel is left as it is (ALBEF), not zeroed."""

    def apply_transform(self, input, params, flags, transform=None):  # noqa: A002 (kornia's signature)
        low = input.amin(dim=(-2, -1), keepdim=True)
        span = input.amax(dim=(-2, -1), keepdim=True) - low
        return torch.where(span > 0, (input - low) / span.clamp(min=1e-12), input)


GEOMETRIC_FILL = 0.5  # ALBEF fills with grey 128


class _GreyFill:
    """Mixin for kornia's zero-padded warps: warping ``x - fill`` and adding ``fill`` back is the same
    warp (interpolation weights sum to one) with ``fill`` in the uncovered area."""

    def apply_transform(self, input, params, flags, transform=None):  # noqa: A002 (kornia's signature)
        return super().apply_transform(input - GEOMETRIC_FILL, params, flags, transform) + GEOMETRIC_FILL


class _GreyRotation(_GreyFill, K.RandomRotation):
    pass


class _GreyShear(_GreyFill, K.RandomShear):
    pass


class _GreyTranslate(_GreyFill, K.RandomTranslate):
    pass


_GREY = {K.RandomRotation: _GreyRotation, K.RandomShear: _GreyShear, K.RandomTranslate: _GreyTranslate}


class Brightness(OperationBase):
    """RandAugment's brightness operation with a multiplicative factor drawn from ``magnitude_range``."""

    def __init__(self, initial_magnitude: float | None, initial_probability: float,
                 magnitude_range: tuple[float, float]) -> None:
        super().__init__(_MultiplyBrightness(magnitude_range, same_on_batch=False, p=initial_probability),
                         initial_magnitude=[("brightness_factor", initial_magnitude)], temperature=0.1)


class AutoContrast(OperationBase):
    """RandAugment's autocontrast operation, ALBEF's way (see :class:`_AlbefAutoContrast`)."""

    def __init__(self, initial_probability: float) -> None:
        super().__init__(_AlbefAutoContrast(same_on_batch=False, p=initial_probability), initial_magnitude=None,
                         temperature=0.1)


def _operation(name: str, low: float, high: float, p: float) -> OperationBase:
    """One kornia operation applied per image with probability ``p``; "identity" is brightness factor 1."""
    if name == "identity":
        return Brightness(None, p, magnitude_range=(1.0, 1.0))
    if name == "auto_contrast":
        return AutoContrast(p)
    if name == "equalize":
        return Equalize(p)
    if name in ("brightness", "sharpness"):
        cls = Brightness if name == "brightness" else Sharpness
        return cls(None, p, magnitude_range=(low, high))
    symmetric = {"shear_x": ShearX, "shear_y": ShearY, "translate_x": TranslateX, "translate_y": TranslateY,
                 "rotate": Rotate}
    if name in symmetric:
        op = symmetric[name](None, p, magnitude_range=(0.0, high), symmetric_megnitude=True)
        op.op.__class__ = _GREY[type(op.op)]  # the same warp, filled with grey (adds no state)
        return op
    raise ValueError(f"unknown RandAugment operation {name!r}")


class AlbefRandAugment(RandAugment):
    """kornia's RandAugment with ALBEF's operation list, per-operation probability 0.5 and draws with
    replacement (see the module docstring). Input and output: float (B, C, H, W) in [0, 1]."""

    def __init__(self, n: int, m: float, policy: list | None = None, p: float = ALBEF_OP_PROBABILITY) -> None:
        self.op_probability = p
        policy = ALBEF_POLICY if policy is None else policy
        m = min(max(float(m), 1e-3), 30 - 1e-3)  # kornia requires 0 < m < 30
        super().__init__(n=min(n, len(policy)), m=m, policy=policy)
        self.n = n  # drawn with replacement below, so n may exceed the number of operations

    def compose_subpolicy_sequential(self, subpolicy: list) -> PolicySequential:
        (name, low, high), = subpolicy
        return PolicySequential(_operation(name, low, high, self.op_probability))

    def rand_selector(self, n: int) -> torch.Tensor:
        return torch.randint(len(self._modules), (n,))


def _normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (images - mean.to(images)) / std.to(images)


class _CpuRandomness(nn.Module):
    """Keeps kornia's random samplers on the CPU generator when the module moves to a device, and
    freezes kornia's learnable operation probabilities (augmentation is not trained; an unused
    parameter would also break DDP)."""

    def freeze(self) -> None:
        for param in self.parameters():
            param.requires_grad_(False)

    def _apply(self, fn, *args, **kwargs):
        # Module.to()/.cuda() would move kornia's samplers to the device (its CUDA generator); keep them
        # on the CPU generator, so torch.get_rng_state() alone reproduces the draws on any device
        out = super()._apply(fn, *args, **kwargs)
        for module in self.modules():
            if isinstance(module, _BasicAugmentationBase):
                module.set_rng_device_and_dtype(torch.device("cpu"), torch.float32)
        return out


class TrainAugment(_CpuRandomness):
    """ALBEF's training augmentation, batched: uint8 (B, 3, S, S) -> float (B, 3, size, size), normalised.

    Random resized crop (``augment.crop_scale`` of the area, aspect ratio 3/4-4/3, bicubic) to
    ``image_size``, horizontal flip with probability 0.5 when ``augment.hflip``, RandAugment when
    ``augment.randaug_ops > 0``, then ``(x - CLIP_MEAN) / CLIP_STD``. Works on any device; a batch of
    B = 0 gives a (0, 3, image_size, image_size) tensor.
    """

    def __init__(self, image_size: int, augment: AugmentConfig) -> None:
        super().__init__()
        if augment.randaug_ops < 0:
            raise ConfigError(f"data.augment.randaug_ops must be >= 0, got {augment.randaug_ops}")
        self.image_size = image_size
        self.crop = K.RandomResizedCrop(
            (image_size, image_size), scale=tuple(augment.crop_scale), ratio=(3 / 4, 4 / 3), resample="BICUBIC",
        )
        self.flip = K.RandomHorizontalFlip(p=0.5) if augment.hflip else None
        self.randaug = (
            AlbefRandAugment(augment.randaug_ops, 3 * augment.randaug_magnitude, albef_policy(augment.randaug_exclude))
            if augment.randaug_ops > 0 else None
        )
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> float32 (B, 3, image_size, image_size), normalised."""
        if images.shape[0] == 0:
            return images.new_zeros((0, 3, self.image_size, self.image_size), dtype=torch.float32)
        x = images.float() / 255.0
        x = self.crop(x).clamp_(0.0, 1.0)  # bicubic overshoots [0, 1]
        if self.flip is not None:
            x = self.flip(x)
        if self.randaug is not None:
            x = self.randaug(x).clamp_(0.0, 1.0)
        return _normalise(x, self.mean, self.std)


class EvalTransform(nn.Module):
    """uint8 (B, 3, S, S) -> float32 (B, 3, image_size, image_size): bicubic resize (if S differs),
    then CLIP normalisation. B = 0 gives an empty (0, 3, image_size, image_size) tensor."""

    def __init__(self, image_size: int) -> None:
        super().__init__()
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[0] == 0:
            return images.new_zeros((0, 3, self.image_size, self.image_size), dtype=torch.float32)
        x = images.float() / 255.0
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=True).clamp_(0.0, 1.0)
        return _normalise(x, self.mean, self.std)


class Distort(_CpuRandomness):
    """A further distorted view of already normalised images (SoftMask's multi-modal augmentation):
    float (B, 3, S, S) normalised -> the same shape, after ``ops`` more RandAugment operations of
    ``magnitude`` (ALBEF's 0-10 scale) applied in pixel space. Randomness from torch's global CPU RNG."""

    def __init__(self, ops: int, magnitude: int, exclude: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__()
        self.randaug = AlbefRandAugment(ops, 3 * magnitude, albef_policy(exclude)) if ops > 0 else None
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.randaug is None or images.shape[0] == 0:
            return images
        x = (images * self.std + self.mean).clamp_(0.0, 1.0)
        return _normalise(self.randaug(x).clamp_(0.0, 1.0), self.mean, self.std)


def training_transform(image_size: int, augment: AugmentConfig) -> nn.Module:
    """The training view of a task: :class:`TrainAugment`, or :class:`EvalTransform` when
    ``augment.enabled`` is false."""
    return TrainAugment(image_size, augment) if augment.enabled else EvalTransform(image_size)
