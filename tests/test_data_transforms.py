"""Device-side augmentation: shapes, normalisation, reproducibility from torch's RNG, flips, RandAugment."""

from __future__ import annotations

import pytest
import torch

from softmask.config import AugmentConfig
from softmask.data.transforms import ALBEF_POLICY, CLIP_MEAN, CLIP_STD, AlbefRandAugment, EvalTransform, TrainAugment

SIZE = 24


def images(b: int = 6, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def normalised(value: float) -> torch.Tensor:
    """(3,) the normalised value of a grey level in [0, 255]."""
    return (value / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def test_train_augment_shapes_and_dtype():
    aug = TrainAugment(SIZE, AugmentConfig())
    out = aug(images(size=32))
    assert out.shape == (6, 3, SIZE, SIZE) and out.dtype == torch.float32 and torch.isfinite(out).all()
    low, high = normalised(0.0).min().item(), normalised(255.0).max().item()
    assert out.min() >= low - 1e-5 and out.max() <= high + 1e-5
    empty = aug(images(0))
    assert empty.shape == (0, 3, SIZE, SIZE) and empty.dtype == torch.float32


def test_normalisation_with_augmentation_off():
    plain = TrainAugment(SIZE, AugmentConfig(crop_scale=[1.0, 1.0], hflip=False, randaug_ops=0))
    grey = torch.full((2, 3, SIZE, SIZE), 200, dtype=torch.uint8)
    expected = normalised(200.0).view(1, 3, 1, 1).expand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(plain(grey), expected)
    x = images(2)
    torch.testing.assert_close(plain(x), (x / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
                               / torch.tensor(CLIP_STD).view(1, 3, 1, 1))


def test_train_augment_is_reproducible_from_torch_rng():
    aug = TrainAugment(SIZE, AugmentConfig())
    x = images(8)
    torch.manual_seed(11)
    first = aug(x)
    torch.manual_seed(11)
    assert torch.equal(aug(x), first)
    state = torch.get_rng_state()
    a = aug(x)
    torch.set_rng_state(state)
    assert torch.equal(aug(x), a)
    assert not torch.equal(a, first)


def test_hflip_only_config_flips_some_images():
    aug = TrainAugment(SIZE, AugmentConfig(crop_scale=[1.0, 1.0], hflip=True, randaug_ops=0))
    x = torch.zeros(32, 3, SIZE, SIZE, dtype=torch.uint8)
    x[..., SIZE // 2:] = 255  # dark left half, bright right half
    torch.manual_seed(0)
    out = aug(x)
    straight = TrainAugment(SIZE, AugmentConfig(crop_scale=[1.0, 1.0], hflip=False, randaug_ops=0))(x)
    flipped = straight.flip(-1)
    is_straight = (out == straight).flatten(1).all(1)
    is_flipped = (out == flipped).flatten(1).all(1)
    assert (is_straight | is_flipped).all() and is_straight.any() and is_flipped.any()


def test_eval_transform_resizes_and_normalises():
    grey = torch.full((3, 3, 40, 40), 64, dtype=torch.uint8)
    out = EvalTransform(SIZE)(grey)
    assert out.shape == (3, 3, SIZE, SIZE) and out.dtype == torch.float32
    torch.testing.assert_close(out, normalised(64.0).view(1, 3, 1, 1).expand_as(out))
    assert EvalTransform(SIZE)(images(0)).shape == (0, 3, SIZE, SIZE)
    x = images(2)
    assert torch.equal(EvalTransform(SIZE)(x), EvalTransform(SIZE)(x))  # deterministic


def test_albef_randaugment_operations():
    names = [entry[0][0] for entry in ALBEF_POLICY]
    assert names == ["identity", "auto_contrast", "equalize", "brightness", "sharpness", "shear_x", "shear_y",
                     "translate_x", "translate_y", "rotate"]
    x = 0.2 + 0.4 * torch.rand(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    for entry in ALBEF_POLICY:
        op = AlbefRandAugment(n=1, m=21, policy=[entry], p=1.0)
        changed = (op(x) - x).abs().amax().item() > 1e-3
        assert changed == (entry[0][0] != "identity"), entry
    # drawn with replacement, so n may exceed the ten operations; magnitudes 0 and 30 are accepted
    many = AlbefRandAugment(n=12, m=30)
    assert many(x).shape == x.shape and len(many.rand_selector(12)) == 12
    assert AlbefRandAugment(n=2, m=0)(x).shape == x.shape


def test_samplers_stay_on_the_cpu_generator_after_to():
    aug = TrainAugment(SIZE, AugmentConfig()).to(torch.float64)
    assert aug.crop.device == torch.device("cpu") and aug.crop.dtype == torch.float32
    assert aug(images(2)).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_augment_on_cuda_draws_like_cpu():
    cpu = TrainAugment(SIZE, AugmentConfig())
    gpu = TrainAugment(SIZE, AugmentConfig()).cuda()
    x = images(8)
    torch.manual_seed(3)
    a = gpu(x.cuda())
    crop = gpu.crop._params["src"].cpu()
    torch.manual_seed(3)
    assert a.device.type == "cuda" and torch.equal(gpu(x.cuda()), a)
    torch.manual_seed(3)
    cpu(x)
    assert torch.equal(cpu.crop._params["src"], crop)  # the same crops drawn, on the CPU generator


def _solid(colour, b: int = 4, size: int = 32) -> torch.Tensor:
    """(B, 3, size, size) float image of one colour given in 0-255."""
    return torch.tensor(colour, dtype=torch.float32).div(255).view(1, 3, 1, 1).expand(b, 3, size, size).clone()


def test_brightness_multiplies_and_keeps_the_hue():
    from softmask.data.transforms import _operation

    torch.manual_seed(0)
    image = _solid((30, 200, 40))
    out = _operation("brightness", 0.1, 1.9, 1.0)(image)
    factor = out[:, 0] / image[:, 0]  # per image (red never clips); ALBEF's and PIL's brightness multiplies
    assert not torch.allclose(factor, torch.ones_like(factor))
    for channel in (1, 2):
        expected = (image[:, channel] * factor).clamp(0, 1)
        assert torch.allclose(out[:, channel], expected, atol=1e-5)


def test_autocontrast_leaves_a_constant_channel_and_stretches_the_others():
    from softmask.data.transforms import _operation

    image = _solid((30, 200, 40))
    assert torch.allclose(_operation("auto_contrast", 0, 1, 1.0)(image), image)
    image[:, 1, :4, :4] = 0.1  # green now spans 0.1 .. 200/255: stretched to 0 .. 1
    out = _operation("auto_contrast", 0, 1, 1.0)(image)
    assert out[:, 1].min() == 0.0 and out[:, 1].max() == pytest.approx(1.0)
    assert torch.allclose(out[:, 0], image[:, 0]) and torch.allclose(out[:, 2], image[:, 2])


@pytest.mark.parametrize("name", ["shear_x", "rotate", "translate_y"])
def test_geometric_operations_fill_with_grey(name):
    from softmask.data.transforms import GEOMETRIC_FILL, _operation

    torch.manual_seed(1)
    image = _solid((30, 200, 40), b=8, size=96)  # translations are 10/256 of the side: several pixels here
    high = {"shear_x": ALBEF_POLICY[5][0][2], "rotate": 30.0, "translate_y": ALBEF_POLICY[8][0][2]}[name]
    out = _operation(name, -high, high, 1.0)(image)
    moved = (out - image).abs().amax(dim=(1, 2, 3)) > 0.05
    assert moved.any()
    # Pixels uncovered by the warp are grey; the rest keeps the colour (bilinear blends in between).
    uncovered = (out[moved] - GEOMETRIC_FILL).abs().amax(dim=1) < 1e-5
    kept = (out[moved] - image[moved]).abs().amax(dim=1) < 1e-5
    assert uncovered.any() and kept.any()
    assert (out >= -1e-6).all() and (out.min(dim=1).values >= min(30, 40) / 255 - 1e-5).all()


def test_randaugment_can_leave_operations_out():
    from softmask.config import ConfigError, load_config
    from softmask.data.transforms import albef_policy

    kept = [sub[0][0] for sub in albef_policy(["auto_contrast", "equalize", "brightness"])]
    assert len(kept) == 7 and "brightness" not in kept and "rotate" in kept
    aug = TrainAugment(SIZE, AugmentConfig(randaug_exclude=["auto_contrast", "equalize"]))
    assert len(aug.randaug._modules) == 8
    with pytest.raises(ConfigError, match=r"randaug_exclude: unknown \[.autocontrast.\]; each must be one of identity"):
        load_config(None, ["data.augment.randaug_exclude=[autocontrast]"])
