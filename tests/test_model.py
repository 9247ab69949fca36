"""The public model API: shapes, cross-attention probabilities, padding, persistence."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from softmask import VisionLanguageModel, create_model, from_pretrained, load_config
from softmask.models.vlp import pool_text

from helpers import text_batch, tiny_model_config


def _inputs(model, b=3):
    ids, mask = text_batch(b=b)
    pixels = torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return pixels, ids, mask


def test_api_shapes(tiny_model):
    pixels, ids, mask = _inputs(tiny_model)
    image = tiny_model.encode_image(pixels)
    text = tiny_model.encode_text(ids, mask)
    fused = tiny_model.fuse(text, mask, image)
    assert image.shape == (3, 17, 48) and text.shape == (3, 9, 32) and fused.shape == (3, 9, 32)
    assert tiny_model.itm_logits(fused).shape == (3, 2)
    assert tiny_model.mlm_logits(fused).shape == (3, 9, 120)
    img_feat, txt_feat = tiny_model.image_feat(image), tiny_model.text_feat(text, mask)
    assert img_feat.shape == txt_feat.shape == (3, 16)
    assert torch.allclose(img_feat.norm(dim=-1), torch.ones(3))


def test_text_pooling_cls_and_masked_mean():
    embeds = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    assert torch.equal(pool_text(embeds, mask, "cls"), embeds[:, 0])
    mean = pool_text(embeds, mask, "mean")
    assert torch.allclose(mean[0], embeds[0].mean(0)) and torch.allclose(mean[1], embeds[1, :2].mean(0))
    with pytest.raises(ValueError, match="'max'"):
        pool_text(embeds, mask, "max")


def test_mean_pooled_text_feature_ignores_padding():
    model = create_model(tiny_model_config("text_pooling=mean")).eval()
    ids, mask = text_batch(b=3)
    with torch.no_grad():
        feat = model.text_feat(model.encode_text(ids, mask), mask)
        padded_ids, padded_mask = F.pad(ids, (0, 4)), F.pad(mask, (0, 4))
        padded = model.text_feat(model.encode_text(padded_ids, padded_mask), padded_mask)
        cls_feat = F.normalize(model.text_proj(model.encode_text(ids, mask)[:, 0]), dim=-1)
    assert torch.allclose(feat, padded, atol=1e-5)
    assert not torch.allclose(feat, cls_feat, atol=1e-3)


def test_itm_reads_the_fused_cls_or_the_mean_of_the_fused_caption():
    torch.manual_seed(0)
    cls_model = create_model(tiny_model_config()).eval()
    mean_model = create_model(tiny_model_config("fused_pooling=mean")).eval()
    mean_model.load_state_dict(cls_model.state_dict())
    ids, mask = text_batch(b=3)
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        fused = cls_model.fuse(cls_model.encode_text(ids, mask), mask, cls_model.encode_image(pixels))
        assert torch.equal(cls_model.itm_logits(fused), cls_model.itm_head(fused[:, 0]))  # ALBEF, mask not needed
        mean = mean_model.itm_logits(fused, mask)
        assert torch.allclose(mean, mean_model.itm_head(pool_text(fused, mask, "mean")))
        # padding rows change nothing
        padded = F.pad(fused, (0, 0, 0, 3), value=7.0)
        assert torch.allclose(mean_model.itm_logits(padded, F.pad(mask, (0, 3))), mean, atol=1e-6)
    with pytest.raises(ValueError, match="fused_pooling is 'mean'"):
        mean_model.itm_logits(fused)
    with pytest.raises(Exception, match="fused_pooling"):
        load_config(None, ["model.fused_pooling=max"])


@pytest.mark.parametrize("layer", [0, 1])
def test_cross_attention_probabilities(tiny_model, layer):
    pixels, ids, mask = _inputs(tiny_model)
    image, text = tiny_model.encode_image(pixels), tiny_model.encode_text(ids, mask)
    fused, probs = tiny_model.fuse(text, mask, image, attention_layer=layer)
    assert probs.shape == (3, 2, 9, 17)  # (B, heads, T, 1 + N)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 2, 9), atol=1e-6)
    # The explicit path used for the asked layer equals the SDPA path of the other layers.
    assert torch.allclose(fused, tiny_model.fuse(text, mask, image), atol=1e-5)
    # The probabilities are inside the autograd graph: the ITM logit can be differentiated by them.
    (grad,) = torch.autograd.grad(tiny_model.itm_logits(fused)[:, 1].sum(), probs)
    assert grad.shape == probs.shape and grad.abs().sum() > 0


def test_attention_layer_out_of_range(tiny_model):
    pixels, ids, mask = _inputs(tiny_model)
    with pytest.raises(ValueError, match=r"fusion-layer index in \[0, 2\)"):
        tiny_model.fuse(tiny_model.encode_text(ids, mask), mask, tiny_model.encode_image(pixels), attention_layer=2)


def test_padding_does_not_change_real_tokens(tiny_model):
    pixels, ids, mask = _inputs(tiny_model, b=1)
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    with torch.no_grad():
        image = tiny_model.encode_image(pixels)
        a = tiny_model.fuse(tiny_model.encode_text(ids, mask), mask, image)
        b = tiny_model.fuse(tiny_model.encode_text(padded_ids, padded_mask), padded_mask, image)
    assert torch.allclose(a, b[:, : ids.shape[1]], atol=1e-5)


def test_image_width_may_differ_from_text_width():
    model = create_model(tiny_model_config("vision.width=40", "vision.num_heads=4", "vision.mlp_dim=80"))
    assert model.fusion_encoder.layers[0].cross_attn.kv.weight.shape == (2 * 32, 40)
    pixels, ids, mask = _inputs(model)
    assert model.fuse(model.encode_text(ids, mask), mask, model.encode_image(pixels)).shape == (3, 9, 32)


def test_training_step_reaches_every_parameter(tiny_model):
    tiny_model.train()
    pixels, ids, mask = _inputs(tiny_model)
    image, text = tiny_model.encode_image(pixels), tiny_model.encode_text(ids, mask)
    fused = tiny_model.fuse(text, mask, image)
    loss = (tiny_model.itm_logits(fused).sum() + tiny_model.mlm_logits(fused).mean()
            + (tiny_model.image_feat(image) @ tiny_model.text_feat(text, mask).T / tiny_model.temp).sum())
    loss.backward()
    no_grad = [n for n, p in tiny_model.named_parameters() if p.grad is None]
    assert no_grad == []


def test_save_and_from_pretrained_round_trip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.yaml").is_file() and (tmp_path / "m" / "model.safetensors").is_file()
    loaded = from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, VisionLanguageModel) and loaded.config == tiny_model.config
    for (k, a), (_, b) in zip(tiny_model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    pixels, ids, mask = _inputs(tiny_model)
    with torch.no_grad():
        out_a = tiny_model.fuse(tiny_model.encode_text(ids, mask), mask, tiny_model.encode_image(pixels))
        out_b = loaded.fuse(loaded.encode_text(ids, mask), mask, loaded.encode_image(pixels))
    assert torch.equal(out_a, out_b)


def test_save_pretrained_does_not_reapply_init(tmp_path):
    # A model initialised from MiniLM saves init="" so that loading it back takes its own weights.
    cfg = load_config(None, ["model.text.init=minilm", "model.text.hidden_size=384", "model.text.num_layers=6",
                             "model.text.fusion_layer=3", "model.text.intermediate_size=1536",
                             "model.vision.image_size=32", "model.vision.patch_size=16", "model.vision.width=32",
                             "model.vision.depth=1", "model.vision.num_heads=2", "model.vision.mlp_dim=32"])
    model = create_model(cfg)
    with torch.no_grad():
        model.text_encoder.embeddings.norm.bias.add_(1.0)
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.config.text.init == ""
    assert torch.equal(loaded.text_encoder.embeddings.norm.bias, model.text_encoder.embeddings.norm.bias)


def test_create_model_accepts_whole_config_or_section(tiny_cfg):
    from softmask.config import Config

    assert isinstance(create_model(Config(model=tiny_cfg)), VisionLanguageModel)
    with pytest.raises(TypeError, match="Config or ModelConfig"):
        create_model({"model": {}})


@pytest.mark.slow
def test_full_size_4m_config_runs_one_forward():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/pretrain/4m.yaml")
    torch.manual_seed(0)
    model = create_model(cfg).eval()
    assert 200e6 < sum(p.numel() for p in model.parameters()) < 260e6
    ids = torch.randint(1000, 30000, (1, 30))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        image = model.encode_image(torch.randn(1, 3, 256, 256))
        fused, probs = model.fuse(model.encode_text(ids, mask), mask, image, attention_layer=2)
        logits = model.itm_logits(fused)
    assert image.shape == (1, 257, 768) and fused.shape == (1, 30, 768) and probs.shape == (1, 12, 30, 257)
    assert torch.isfinite(logits).all()


def test_fuse_with_shared_images_equals_gathered_images(tiny_model):
    pixels, ids, mask = _inputs(tiny_model)
    image, text = tiny_model.encode_image(pixels), tiny_model.encode_text(ids, mask)
    index = torch.tensor([2, 0, 2])
    with torch.no_grad():
        shared = tiny_model.fuse(text, mask, image, image_index=index)
        gathered = tiny_model.fuse(text, mask, image[index])
    assert torch.allclose(shared, gathered, atol=1e-6)
