"""Text and fusion encoders: parity with transformers.BertModel (real MiniLM and a random tiny BERT),
the split at fusion_layer, the MLM head, and size checks."""

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from softmask import CheckpointError, create_model
from softmask.checkpoint_files import resolve_checkpoint
from softmask.models.loading import load_text_checkpoint

from helpers import text_batch, tiny_model_config


def _parity(model, hf, vocab, fusion_layer):
    ids, mask = text_batch(vocab=vocab, b=3, t=11)
    with torch.no_grad():
        ours = model.encode_text(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[fusion_layer]
    real = mask.bool()
    return (ours - ref)[real].abs().max().item()


def test_text_encoder_matches_real_minilm():
    path = resolve_checkpoint("minilm")
    hf = BertModel.from_pretrained(path).eval()
    cfg = tiny_model_config("text.init=minilm", "text.vocab_size=30522", "text.hidden_size=384",
                            "text.num_layers=6", "text.fusion_layer=3", "text.num_heads=12",
                            "text.intermediate_size=1536", "text.max_positions=512")
    model = create_model(cfg).eval()
    assert _parity(model, hf, 30522, 3) <= 1e-4
    # The fusion layers hold BERT layers 3-5: their self-attention and FFN weights come from there.
    ours = model.fusion_encoder.layers[0].ffn.fc1.weight
    assert torch.equal(ours, hf.encoder.layer[3].intermediate.dense.weight)


def _tiny_hf_bert(tmp_path, cls=BertModel, **kw):
    torch.manual_seed(1)
    hf_cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, **kw)
    hf = cls(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    path = tmp_path / "hf_bert"
    hf.save_pretrained(path)
    return cls.from_pretrained(path).eval(), path


@pytest.mark.parametrize("fusion_layer", [1, 2, 3])
def test_text_encoder_matches_random_tiny_bert(tmp_path, fusion_layer):
    hf, path = _tiny_hf_bert(tmp_path)
    model = create_model(tiny_model_config(f"text.init={path}", f"text.fusion_layer={fusion_layer}")).eval()
    assert _parity(model, hf, 120, fusion_layer) <= 1e-4


def test_mlm_head_loads_and_matches(tmp_path):
    hf, path = _tiny_hf_bert(tmp_path, cls=BertForMaskedLM)
    model = create_model(tiny_model_config()).eval()
    report = load_text_checkpoint(model, path)
    assert not any(k.startswith("mlm_head.") for k in report.missing)
    # transformers does not save the tied decoder weight; older BERT files do, and it is skipped as tied.
    assert set(report.ignored) <= {"cls.predictions.decoder.weight"}
    hidden = torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(model.mlm_logits(hidden), hf.cls(hidden), atol=1e-5)


def test_cross_attention_starts_random_and_is_reported(tmp_path):
    _, path = _tiny_hf_bert(tmp_path)
    model = create_model(tiny_model_config())
    report = load_text_checkpoint(model, path)
    cross = [k for k in report.missing if ".cross_attn." in k or ".cross_norm." in k]
    assert len(cross) == 2 * 8  # 2 fusion layers x (q, kv, out, norm) x (weight, bias)
    assert not report.unexpected
    assert "cross-attention tensors are new" in report.summary()


def test_size_mismatch_names_setting_and_checkpoint(tmp_path):
    _, path = _tiny_hf_bert(tmp_path)
    with pytest.raises(CheckpointError, match=r"model.text.hidden_size is 64 but the checkpoint .* has 32"):
        create_model(tiny_model_config(f"text.init={path}", "text.hidden_size=64"))
    with pytest.raises(CheckpointError, match=r"model.text.num_layers is 6 but .* has 4 \(layers\)"):
        create_model(tiny_model_config(f"text.init={path}", "text.num_layers=6"))
    with pytest.raises(CheckpointError, match=r"model.text.num_heads is 4 but .* has 2 \(num_attention_heads\)"):
        create_model(tiny_model_config(f"text.init={path}", "text.num_heads=4"))


def test_too_long_text_is_a_clear_error(tiny_model):
    ids = torch.ones(1, 41, dtype=torch.long)
    with pytest.raises(ValueError, match=r"41 tokens, more than model.text.max_positions \(40\)"):
        tiny_model.encode_text(ids, torch.ones_like(ids))


def test_pytorch_model_bin_folder(tmp_path):
    # Older Hugging Face folders hold pytorch_model.bin (a pickled state dict) instead of safetensors.
    hf, path = _tiny_hf_bert(tmp_path, cls=BertForMaskedLM)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((path / "config.json").read_text())
    torch.save({"bert." + k: v for k, v in hf.bert.state_dict().items()}
               | {"cls." + k: v for k, v in hf.cls.state_dict().items()}, legacy / "pytorch_model.bin")
    model = create_model(tiny_model_config(f"text.init={legacy}")).eval()
    assert torch.equal(model.mlm_head.bias, hf.cls.predictions.bias)
    ids, mask = text_batch()
    with torch.no_grad():
        ref = hf.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        assert (model.encode_text(ids, mask) - ref)[mask.bool()].abs().max() <= 1e-4


def test_packed_tokens_give_the_padded_layouts_outputs_at_every_real_token():
    """text.pack_tokens: the per-token work on the real tokens only; attention still on the padded batch."""
    outputs = {}
    for pack in (False, True):
        torch.manual_seed(0)
        model = create_model(tiny_model_config(f"text.pack_tokens={pack}", "text.dropout=0.0",
                                               "text.attention_dropout=0.0")).eval()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(5, 120, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 5:], mask[2, 2:], mask[3, 8:] = 0, 0, 0
        image = model.encode_image(torch.randn(4, 3, 32, 32, generator=g))
        text = model.encode_text(ids * mask, mask)
        fused, probs = model.fuse(text, mask, image, attention_layer=0)
        weights = torch.randn(fused.shape[-1], generator=g)
        (fused[mask.bool()] @ weights).square().sum().backward()  # what every consumer reads: the real tokens
        outputs[pack] = (text.detach(), fused.detach(), probs.detach(),
                         model.text_encoder.embeddings.word_embeddings.weight.grad.clone())
    real = mask.bool()
    for plain, packed in zip(outputs[False][:2], outputs[True][:2], strict=True):
        assert torch.allclose(packed[real], plain[real], atol=1e-5)
        assert packed[~real].abs().max() == 0  # padding is zeros when packed
    probs_plain, probs_packed = outputs[False][2], outputs[True][2]
    assert torch.allclose(probs_packed.transpose(1, 2)[real], probs_plain.transpose(1, 2)[real], atol=1e-6)
    grad_plain, grad_packed = outputs[False][3], outputs[True][3]
    assert grad_plain.abs().max() > 1e-3 and torch.allclose(grad_packed, grad_plain, rtol=1e-4, atol=1e-6)
