"""ViT parity with transformers.ViTModel, position-embedding resizing, timm/DeiT state dicts."""

import pytest
import torch
from transformers import ViTConfig, ViTModel

from softmask import CheckpointError, create_model
from softmask.models.loading import load_vision_checkpoint
from softmask.models.vit import resize_pos_embed

from helpers import tiny_model_config


def test_resize_pos_embed_is_identity_at_same_size():
    pos = torch.randn(1, 1 + 16, 8)
    assert resize_pos_embed(pos, 4) is pos
    assert resize_pos_embed(pos, (4, 4)) is pos


def test_resize_pos_embed_shapes_and_prefix():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    out = resize_pos_embed(pos, 16)
    assert out.shape == (1, 1 + 256, 8)
    assert torch.equal(out[:, :1], pos[:, :1])  # [CLS] untouched
    two = resize_pos_embed(torch.randn(1, 2 + 9, 4), (5, 6), num_prefix_tokens=2)
    assert two.shape == (1, 2 + 30, 4)


def test_resize_pos_embed_preserves_a_smooth_field():
    # A linear ramp over the grid stays (nearly) linear after bicubic resampling.
    g = 8
    ramp = torch.linspace(0, 1, g).repeat(g, 1).reshape(1, g * g, 1)
    pos = torch.cat([torch.zeros(1, 1, 1), ramp], dim=1)
    out = resize_pos_embed(pos, 12)[0, 1:, 0].reshape(12, 12)
    assert torch.allclose(out[0], out[5], atol=1e-6)  # constant along rows
    assert (out[0, 1:] >= out[0, :-1] - 1e-6).all()  # monotone along columns


def test_resize_pos_embed_rejects_non_square():
    with pytest.raises(ValueError, match="not a square grid"):
        resize_pos_embed(torch.randn(1, 1 + 10, 4), 4)


def _hf_vit(tmp_path, image_size=32, **kw):
    torch.manual_seed(0)
    hf_cfg = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                       image_size=image_size, patch_size=8, layer_norm_eps=1e-6, **kw)
    hf = ViTModel(hf_cfg, add_pooling_layer=True).eval()
    with torch.no_grad():  # make every tensor non-trivial (biases start at zero)
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "hf_vit"
    hf.save_pretrained(path)
    return ViTModel.from_pretrained(path).eval(), path


def test_vit_matches_transformers(tmp_path):
    hf, path = _hf_vit(tmp_path)
    model = create_model(tiny_model_config(f"vision.init={path}")).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.encode_image(pixels)
        ref = hf(pixel_values=pixels).last_hidden_state
    assert ours.shape == (2, 1 + 16, 48)
    assert (ours - ref).abs().max() <= 1e-4


def test_vit_load_report_and_interpolation(tmp_path):
    hf, path = _hf_vit(tmp_path)
    model = create_model(tiny_model_config("vision.image_size=48")).eval()
    report = load_vision_checkpoint(model, path)
    assert not report.missing and not report.unexpected
    assert set(report.ignored) == {"pooler.dense.weight", "pooler.dense.bias"}
    assert any("resized from a 4x4 to a 6x6" in n for n in report.notes)
    expected = resize_pos_embed(hf.embeddings.position_embeddings.detach(), 6)
    assert torch.allclose(model.visual_encoder.pos_embed, expected)
    assert "loaded" in report.summary() and "pooler" in report.summary()


def _timm_state_dict(model, distilled=False):
    """The tiny model's ViT under timm names, as a DeiT release nests it."""
    sd = {k[len("visual_encoder."):]: v.clone() + 0.01 * torch.randn_like(v)
          for k, v in model.state_dict().items() if k.startswith("visual_encoder.")}
    sd["head.weight"], sd["head.bias"] = torch.randn(10, 48), torch.randn(10)
    if distilled:
        sd["dist_token"] = torch.randn(1, 1, 48)
        pos = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pos[:, :1], torch.randn(1, 1, 48), pos[:, 1:]], dim=1)
        sd["head_dist.weight"] = torch.randn(10, 48)
    return sd


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_state_dict_loads(tmp_path, tiny_model, suffix):
    sd = _timm_state_dict(tiny_model)
    path = tmp_path / f"deit{suffix}"
    if suffix == ".pth":
        torch.save({"model": sd, "epoch": 3}, path)
    else:
        from safetensors.torch import save_file
        save_file(sd, str(path))
    report = load_vision_checkpoint(tiny_model, path)
    assert not report.missing and not report.unexpected
    assert set(report.ignored) == {"head.weight", "head.bias"}
    for key in ("blocks.1.attn.qkv.weight", "pos_embed", "patch_embed.proj.weight", "norm.bias"):
        assert torch.equal(tiny_model.state_dict()["visual_encoder." + key], sd[key])


def test_distilled_deit_drops_its_token(tmp_path, tiny_model):
    sd = _timm_state_dict(tiny_model, distilled=True)
    torch.save(sd, tmp_path / "deit_distilled.pth")
    report = load_vision_checkpoint(tiny_model, tmp_path / "deit_distilled.pth")
    pos = tiny_model.visual_encoder.pos_embed
    assert torch.equal(pos[:, :1], sd["pos_embed"][:, :1]) and torch.equal(pos[:, 1:], sd["pos_embed"][:, 2:])
    assert "dist_token" in report.ignored


def test_vit_size_mismatch_names_both(tmp_path):
    _, path = _hf_vit(tmp_path)
    model = create_model(tiny_model_config("vision.width=64", "vision.mlp_dim=96"))
    with pytest.raises(CheckpointError, match=r"model.vision.width is 64 but the checkpoint .* has 48 \(width\)"):
        load_vision_checkpoint(model, path)
    deeper = create_model(tiny_model_config("vision.depth=3"))
    with pytest.raises(CheckpointError, match=r"model.vision.depth is 3 but .* has 2 \(blocks\)"):
        load_vision_checkpoint(deeper, path)


def test_wrong_image_size_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match=r"expects pixels of shape \(B, 3, 32, 32\)"):
        tiny_model.encode_image(torch.randn(1, 3, 48, 48))


def test_hf_deit_folder_matches(tmp_path):
    # Hugging Face DeiT keeps a distillation token; its [CLS]-path without that token is our ViT, so
    # check the loaded weights rather than outputs, and that the distillation slot is dropped.
    from transformers import DeiTConfig, DeiTModel

    torch.manual_seed(0)
    hf = DeiTModel(DeiTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96,
                              image_size=32, patch_size=8)).eval()
    hf.save_pretrained(tmp_path / "deit")
    model = create_model(tiny_model_config())
    report = load_vision_checkpoint(model, tmp_path / "deit")
    assert not report.missing and not report.unexpected
    pos = hf.embeddings.position_embeddings.detach()
    assert torch.equal(model.visual_encoder.pos_embed, torch.cat([pos[:, :1], pos[:, 2:]], dim=1))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "deit" / "model.safetensors"))  # the on-disk (legacy) names
    q = saved["encoder.layer.1.attention.attention.query.weight"]
    assert torch.equal(model.visual_encoder.blocks[1].attn.qkv.weight[:48], q)


def test_conv_stem_gives_one_token_per_patch_and_sees_across_patch_borders():
    from softmask.config import ConfigError, model_config_from_dict
    from softmask.models.vit import VisionTransformer

    vision = {"image_size": 32, "patch_size": 8, "width": 48, "depth": 1, "num_heads": 2, "mlp_dim": 96}
    torch.manual_seed(0)
    vit = VisionTransformer(model_config_from_dict({"vision": {**vision, "stem": "conv"}}).vision).eval()
    pixels = torch.zeros(1, 3, 32, 32)
    base = vit.patch_embed(pixels)
    assert base.shape == (1, 16, 48) and vit(pixels).shape == (1, 17, 48)
    # A pixel of patch (0, 0) next to its right border changes the token of patch (0, 1) too (a linear
    # patch projection could not), and leaves the other patches alone.
    pixels[0, :, 0, 7] = 1.0
    changed = (vit.patch_embed(pixels) - base).abs().sum(-1)[0]
    assert changed[0] > 0 and changed[1] > 0 and torch.all(changed[2:] == 0)
    # Two convolutions per level (the second of stride 1): the same grid, a wider view.
    deep = VisionTransformer(model_config_from_dict({"vision": {**vision, "stem": "conv", "stem_convs_per_level": 2,
                                                                "stem_channels": 32}}).vision).eval()
    strides = [m.stride[0] for m in deep.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    channels = [m.out_channels for m in deep.patch_embed.stem if isinstance(m, torch.nn.Conv2d)]
    assert strides == [2, 1, 2, 1, 2, 1] and channels == [8, 8, 16, 16, 32, 32]
    assert deep.patch_embed(pixels).shape == (1, 16, 48)
    for bad, message in (({"stem": "resnet"}, "stem must be one of patch, conv"),
                         ({"stem": "conv", "stem_convs_per_level": 0}, "stem_convs_per_level must be"),
                         ({"stem": "conv", "stem_channels": -1}, "stem_channels must be >= 0"),
                         ({"stem": "conv", "patch_size": 12, "image_size": 36}, "power of two")):
        with pytest.raises(ConfigError, match=message):
            model_config_from_dict({"vision": {**vision, **bad}})
