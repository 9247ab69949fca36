"""VQA fine-tuning: accuracy, answer weights and loss, the answer decoder (initialisation, causal and
padding masks), ALBEF's answer ranking, annotation errors, and finetune/evaluate through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from softmask.cli import main
from softmask.data.annotations import AnnotationError
from softmask.data.text import tokenize
from softmask.models.answer_decoder import AnswerDecoder, build_answer_decoder, token_log_probs
from softmask.models.vlp import create_model
from softmask.tasks import vqa
from softmask.world import generate_world

from helpers import tiny_config, tiny_model_config

CONFIG = "configs/finetune/vqa_tiny.yaml"


# ---------------------------------------------------------------- accuracy


def test_metrics_per_type_and_without_answers():
    rows = [{"prediction": "red", "answers": ["red"] * 10, "qtype": "colour"},
            {"prediction": "2", "answers": ["3"] * 9 + ["2"], "qtype": "count"},
            {"prediction": "no", "answers": None, "qtype": None}]
    metrics = vqa.vqa_metrics(rows)  # the official 10-choose-9: one matching human of ten gives 9/30
    assert metrics["acc"] == pytest.approx(100 * (1 + 0.3) / 2)
    assert metrics["acc_colour"] == 100.0 and metrics["acc_count"] == pytest.approx(30.0)
    assert metrics["questions"] == 3 and metrics["scored"] == 2
    assert "acc" not in vqa.vqa_metrics(rows[2:])


# ---------------------------------------------------------------- weights and loss


def test_answer_weights_are_shares_of_the_human_answers():
    answers, weights = vqa.answer_weights(["yes"] * 7 + ["no"] * 2 + ["maybe"])
    assert answers == ["yes", "no", "maybe"]
    assert weights == pytest.approx([0.7, 0.2, 0.1])
    assert vqa.answer_weights(["tree"], "vg") == (["tree"], [vqa.VG_ANSWER_WEIGHT])


def _log_softmax(row: list[float]) -> list[float]:
    norm = math.log(sum(math.exp(v) for v in row))
    return [v - norm for v in row]


def test_weighted_loss_equals_hand_computation():
    # Two questions: q0 has answers A ("[CLS] 2 [SEP]") x7 and B ("[CLS] 3 1 [SEP]") x3; q1 has C x10.
    # Vocabulary: 0 pad, 1 [SEP]... any ids; position t's logits score token t + 1.
    ids = torch.tensor([[0, 2, 1, 0], [0, 3, 1, 1], [0, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 4, generator=g)
    (_, w0), (_, w1) = vqa.answer_weights(["A"] * 7 + ["B"] * 3), vqa.answer_weights(["C"] * 10)
    weights = torch.tensor(w0 + w1)
    loss = vqa.weighted_question_loss(vqa.sequence_nll(logits, ids, mask), weights, num_questions=2)

    def nll(n: int) -> float:
        rows = logits[n].tolist()
        length = int(mask[n].sum())
        return -sum(_log_softmax(rows[t])[int(ids[n, t + 1])] for t in range(length - 1))

    expected = (0.7 * nll(0) + 0.3 * nll(1) + 1.0 * nll(2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # Distillation towards a teacher that is sure of the targets leaves the loss unchanged; towards a
    # uniform teacher each token's loss becomes (1 - alpha) NLL + alpha * mean(-log p).
    sure = torch.full_like(logits, -1e4).scatter(-1, torch.cat([ids[:, 1:], ids[:, :1]], 1)[..., None], 1e4)
    assert torch.allclose(vqa.sequence_nll(logits, ids, mask, sure, 0.4), vqa.sequence_nll(logits, ids, mask),
                          atol=1e-4)
    uniform = torch.zeros_like(logits)
    mean_nll = -(torch.log_softmax(logits[0, :2], -1).mean(-1)).sum()
    assert vqa.sequence_nll(logits[:1], ids[:1], mask[:1], uniform[:1], 0.5).item() == pytest.approx(
        0.5 * nll(0) + 0.5 * mean_nll.item(), rel=1e-5)


def _tiny_cfg(*overrides: str):
    return tiny_config("model.text.vocab_size=30522", "data.augment.enabled=false", "data.num_workers=0",
                       "distill.alpha=0", "finetune.task=vqa", *overrides)


def test_task_forward_matches_per_answer_computation():
    """The batched loss (answers flattened, question states shared by index) equals the answers decoded
    one at a time against their own question, weighted by hand."""
    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = vqa.build_model(cfg).eval()
    task = vqa.VQAObjective(cfg, model, alpha_warmup_steps=1).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    ids, mask = tokenize(task.tokenizer, ["what color is the ball", "how many"])
    batch = {"images": images, "input_ids": ids, "attention_mask": mask,
             "answers": [["red", "dark red"], ["two"]], "weights": [[0.8, 0.2], [1.0]]}
    loss = task(batch, step=0)["loss"]
    with torch.no_grad():
        states = model.encode_questions(task.augment(images), ids, mask)
        total = 0.0
        for q, (answers, weights) in enumerate(zip(batch["answers"], batch["weights"], strict=True)):
            for answer, weight in zip(answers, weights, strict=True):
                a_ids, a_mask = tokenize(task.tokenizer, [answer])
                length = int(mask[q].sum())  # the question without its padding
                logits = model.decoder(a_ids, a_mask, states[q:q + 1, :length], mask[q:q + 1, :length])
                total += weight * -token_log_probs(logits, a_ids, a_mask).sum().item()
    assert loss.item() == pytest.approx(total / 2, rel=1e-4)


# ---------------------------------------------------------------- the decoder


def _perturbed(model):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_decoder_is_initialised_from_the_fusion_layers():
    cfg = tiny_model_config("vision.width=32")  # image width = text width: every tensor has a source
    backbone = _perturbed(create_model(cfg))
    decoder, left_random = build_answer_decoder(backbone)
    assert left_random == []
    assert len(decoder.layers) == cfg.text.num_fusion_layers
    pairs = [(decoder.embeddings, backbone.text_encoder.embeddings), (decoder.head, backbone.mlm_head)]
    pairs += list(zip(decoder.layers, backbone.fusion_encoder.layers, strict=True))
    for ours, theirs in pairs:
        theirs_sd = theirs.state_dict()
        for name, tensor in ours.state_dict().items():
            assert torch.equal(tensor, theirs_sd[name]), name
    # Copied, not shared: training the decoder leaves the question encoder alone.
    with torch.no_grad():
        backbone.text_encoder.embeddings.word_embeddings.weight.add_(1.0)
    assert not torch.equal(decoder.embeddings.word_embeddings.weight,
                           backbone.text_encoder.embeddings.word_embeddings.weight)
    assert all(layer.attn.causal for layer in decoder.layers)
    assert not any(layer.attn.causal for layer in backbone.fusion_encoder.layers)


def test_decoder_cross_attention_left_random_only_when_widths_differ():
    backbone = _perturbed(create_model(tiny_model_config()))  # image width 48, text width 32
    decoder, left_random = build_answer_decoder(backbone)
    n = backbone.config.text.num_fusion_layers
    # Only the key/value projection's (2 D, Dv) weight lacks a source; its (2 D,) bias is copied.
    assert sorted(left_random) == [f"layers.{i}.cross_attn.kv.weight" for i in range(n)]
    assert torch.equal(decoder.layers[0].cross_attn.q.weight, backbone.fusion_encoder.layers[0].cross_attn.q.weight)


def _decoder_and_states():
    cfg = tiny_model_config()
    torch.manual_seed(1)
    decoder = AnswerDecoder(cfg.text).eval()
    states = torch.randn(1, 6, cfg.text.hidden_size)
    states_mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    ids = torch.tensor([[1, 17, 23, 42, 57]])
    return decoder, ids, torch.ones_like(ids), states, states_mask


def test_causal_self_attention_hides_later_tokens():
    decoder, ids, mask, states, states_mask = _decoder_and_states()
    changed = ids.clone()
    changed[0, 3] = 99
    with torch.no_grad():
        before = decoder.hidden(ids, mask, states, states_mask)
        after = decoder.hidden(changed, mask, states, states_mask)
        for layer in decoder.layers:  # the same weights, bidirectional
            layer.attn.causal = False
        bidirectional = decoder.hidden(changed, mask, states, states_mask) - decoder.hidden(ids, mask, states,
                                                                                             states_mask)
    assert torch.allclose(before[:, :3], after[:, :3], atol=1e-6)  # positions 0-2 never see token 3
    assert (before[:, 3:] - after[:, 3:]).abs().amax() > 1e-3  # positions 3 and 4 do
    assert bidirectional[:, :3].abs().amax() > 1e-3  # without the causal mask the earlier ones would change


def test_question_padding_is_not_attended():
    decoder, ids, mask, states, states_mask = _decoder_and_states()
    noisy_pad, noisy_token = states.clone(), states.clone()
    noisy_pad[0, 4:] += 5.0
    noisy_token[0, 2] += 5.0
    with torch.no_grad():
        base = decoder.hidden(ids, mask, states, states_mask)
        assert torch.allclose(base, decoder.hidden(ids, mask, noisy_pad, states_mask), atol=1e-6)
        assert (base - decoder.hidden(ids, mask, noisy_token, states_mask)).abs().amax() > 1e-3
        # The cross-attention's explicit path (kept probabilities) masks the same way as the fused one.
        layer = decoder.layers[0].cross_attn
        x = torch.randn(1, 5, states.shape[-1])
        fast, _ = layer(x, states, image_mask=states_mask)
        slow, probs = layer(x, states, return_probs=True, image_mask=states_mask)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert probs[..., 4:].abs().amax() == 0.0


# ---------------------------------------------------------------- ranking


class BigramDecoder:
    """A stub decoder: the next token depends only on the current one, p(next | current) = table[current]."""

    def __init__(self, table: torch.Tensor):
        self.log_table = torch.log(table.clamp_min(1e-12))

    def __call__(self, ids, mask, states, states_mask, states_index=None):
        return self.log_table[ids]


def test_ranking_scores_whole_answers_after_the_first_token_shortlist():
    # Tokens: 0 pad, 1 [CLS], 2 [SEP], 3 "a", 4 "b", 5 "c", 6 "d". Answers "a b", "a c", "d".
    # p(a | CLS) = 0.6, p(d | CLS) = 0.4; p(b | a) = 0.4, p(c | a) = 0.6; then [SEP] surely:
    # whole answers: "a b" 0.24, "a c" 0.36, "d" 0.40.
    table = torch.full((7, 7), 1 / 7)
    table[1] = torch.tensor([0, 0, 0, 0.6, 0, 0, 0.4])
    table[3] = torch.tensor([0, 0, 0, 0, 0.4, 0.6, 0])
    for token in (4, 5, 6):
        table[token] = torch.tensor([0, 0, 1.0, 0, 0, 0, 0])
    answer_ids = torch.tensor([[1, 3, 4, 2], [1, 3, 5, 2], [1, 6, 2, 0]])
    answer_mask = (answer_ids != 0).long()
    states, states_mask = torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.long)
    decoder = BigramDecoder(table)
    best, shortlist, scores = vqa.rank_answers(decoder, states, states_mask, answer_ids, answer_mask, k=3,
                                               ranking="sequence")
    assert best.tolist() == [2, 2]  # "d": the best whole answer, though "a" is the likelier first token
    by_answer = dict(zip(shortlist[0].tolist(), scores[0].exp().tolist(), strict=True))
    assert by_answer == pytest.approx({0: 0.24, 1: 0.36, 2: 0.40})
    # With k = 2 the shortlist holds the two answers starting with "a"; the better whole one wins.
    best, shortlist, _ = vqa.rank_answers(decoder, states, states_mask, answer_ids, answer_mask, k=2,
                                          ranking="sequence")
    assert best.tolist() == [1, 1] and sorted(shortlist[0].tolist()) == [0, 1]
    # ALBEF's formula counts the first token twice: "a b" 0.24 * 0.6, "a c" 0.36 * 0.6 = 0.216, "d" 0.40 * 0.4:
    # it picks "a c" where the whole-answer likelihood picks "d".
    best, shortlist, scores = vqa.rank_answers(decoder, states, states_mask, answer_ids, answer_mask, k=3,
                                               ranking="albef")
    assert best.tolist() == [1, 1]
    by_answer = dict(zip(shortlist[0].tolist(), scores[0].exp().tolist(), strict=True))
    assert by_answer == pytest.approx({0: 0.144, 1: 0.216, 2: 0.16})


def test_ranking_with_the_real_decoder_matches_brute_force():
    decoder, _, _, states, states_mask = _decoder_and_states()
    states = torch.cat([states, torch.randn_like(states)])
    states_mask = torch.cat([states_mask, torch.ones_like(states_mask)])
    g = torch.Generator().manual_seed(5)
    answer_ids = torch.randint(5, 120, (9, 5), generator=g)
    answer_ids[:, 0], answer_ids[:, 2] = 1, answer_ids[0, 1]  # many answers share tokens
    answer_ids[:3, 1] = answer_ids[0, 1]  # three share the first token
    answer_mask = torch.ones_like(answer_ids)
    answer_mask[::2, 3:] = 0  # some answers are shorter (padded)
    answer_ids = answer_ids * answer_mask
    best, shortlist, scores = vqa.rank_answers(decoder, states, states_mask, answer_ids, answer_mask, k=9, chunk=4,
                                               ranking="sequence")
    with torch.no_grad():
        full = torch.stack([token_log_probs(decoder(answer_ids, answer_mask, states[q:q + 1].expand(9, -1, -1),
                                                    states_mask[q:q + 1].expand(9, -1)), answer_ids,
                                            answer_mask).sum(1) for q in range(2)])  # (2, 9)
    assert best.tolist() == full.argmax(1).tolist()
    assert torch.allclose(scores, full.gather(1, shortlist), atol=1e-4)


# ---------------------------------------------------------------- records


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_malformed_answer_names_file_and_record(tmp_path):
    good = {"image": "a.png", "question": "what?", "answer": ["yes"] * 10, "question_id": 1}
    train = _write(tmp_path / "train.json", [good, dict(good, answer=["yes", 3])])
    cfg = _tiny_cfg(f"finetune.train=[{train}]", "finetune.eval_splits=[]")
    with pytest.raises(AnnotationError, match=r"train\.json: record 1: 'answer'"):
        vqa.build_train_data(cfg, 0, 1)
    _write(train, [dict(good, answer=[])])
    with pytest.raises(AnnotationError, match=r"train\.json: record 0: 'answer'"):
        vqa.build_train_data(cfg, 0, 1)
    # Evaluation records may lack answers, but a present answer is still checked.
    test = _write(tmp_path / "test.json", [{k: v for k, v in good.items() if k != "answer"},
                                           dict(good, answer="  ")])
    with pytest.raises(AnnotationError, match=r"test\.json: record 1: 'answer'"):
        vqa.load_eval_records(_tiny_cfg(f"finetune.test=[{test}]"), "test")
    answer_list = _write(tmp_path / "answers.json", ["yes", 7])
    with pytest.raises(AnnotationError, match=r"answers\.json: entry 1"):
        vqa.read_answer_list(str(answer_list))


# ---------------------------------------------------------------- finetune and evaluate through the CLI


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vqa")
    world = root / "world"
    generate_world(world, images=24, size=32, seed=0)
    out = root / "run"
    # Overrides come before --config: argparse cannot place positionals after an option here.
    code = main(["finetune", "vqa", f"world={world}", f"output_dir={out}", "train.max_steps=2",
                 "model.vision.image_size=32", "train.log_every=1", "--config", CONFIG])
    return code, world, out


def _annotations(world: Path, split: str) -> list[dict]:
    return json.loads((world / "annotations" / f"vqa_{split}.json").read_text())


@pytest.mark.slow
def test_finetune_cli_trains_and_writes_metrics_and_results(run):
    code, world, out = run
    assert code == 0
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2] and all(math.isfinite(s["loss"]) for s in steps)
    answer_list = set(json.loads((world / "annotations" / "answer_list.json").read_text()))
    for split in ("val", "test"):
        metrics = json.loads((out / f"metrics_{split}.json").read_text())
        records = _annotations(world, split)
        assert metrics["questions"] == len(records) and 0.0 <= metrics["acc"] <= 100.0
        assert {f"acc_{r['type']}" for r in records} <= set(metrics)
        results = json.loads((out / f"vqa_{split}_results.json").read_text())
        assert [r["question_id"] for r in results] == [r["question_id"] for r in records]
        assert all(isinstance(r["question_id"], int) and r["answer"] in answer_list for r in results)
    saved = (out / "model" / "config.yaml").read_text()
    assert "task: vqa" in saved


@pytest.mark.slow
def test_evaluate_cli_from_the_run_and_a_test_split_without_answers(run, tmp_path):
    code, world, out = run
    assert code == 0
    unanswered = _write(tmp_path / "vqa_test_noanswers.json",
                        [{k: v for k, v in r.items() if k != "answer"} for r in _annotations(world, "test")])
    report, results_dir = tmp_path / "eval.json", tmp_path / "eval"
    code = main(["evaluate", "vqa", f"world={world}", f"finetune.test=[{unanswered}]", "--checkpoint", str(out),
                 "--config", CONFIG, "--json", str(report), "--out", str(results_dir)])
    assert code == 0
    metrics = json.loads(report.read_text())
    trained = json.loads((out / "metrics_val.json").read_text())
    assert metrics["val"]["acc"] == pytest.approx(trained["acc"])  # the same model, the same predictions
    assert "acc" not in metrics["test"] and metrics["test"]["questions"] == len(_annotations(world, "test"))
    results = json.loads((results_dir / "vqa_test_results.json").read_text())
    assert len(results) == len(_annotations(world, "test")) and all(set(r) == {"question_id", "answer"}
                                                                       for r in results)


def _albef_vqa_model(tmp_path):
    """A VQA model loaded from a random ALBEF-layout VQA checkpoint (its decoder 3 layers deep where the model has
    2 fusion layers): (model, the checkpoint's state dict, the model config)."""
    from softmask.config import load_config
    from softmask.tasks.finetune import load_task_model

    from helpers import albef_state_dict, bert_lm_state_dict

    model_cfg = tiny_model_config()
    g = torch.Generator().manual_seed(7)
    sd = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in albef_state_dict(model_cfg).items()
          if k.startswith(("visual_encoder", "text_encoder")) and ".cls." not in k}
    # ALBEF's answer decoder: a BertLMHeadModel whose every layer cross-attends to the fused question (width D).
    decoder = bert_lm_state_dict(lambda *shape: torch.randn(*shape, generator=g), "text_decoder.", model_cfg.text, 3,
                                 0, model_cfg.text.hidden_size, position_ids=False)
    sd.update(decoder)
    sd.update({k.replace("text_decoder.", "text_decoder_m."): v.clone() for k, v in decoder.items()})
    path = tmp_path / "ALBEF_vqa.pth"
    torch.save({"model": sd}, path)
    cfg = load_config(CONFIG, ["finetune.task=vqa"])
    cfg.model = model_cfg
    return load_task_model(cfg, path).eval(), sd, model_cfg


def test_an_albef_vqa_checkpoint_loads_its_answer_decoder_with_the_files_depth(tmp_path):
    model, sd, model_cfg = _albef_vqa_model(tmp_path)
    assert len(model.decoder.layers) == 3
    p = "text_decoder.bert.encoder.layer."
    assert torch.equal(model.decoder.layers[2].ffn.fc2.weight, sd[p + "2.output.dense.weight"])
    kv = torch.cat([sd[p + f"0.crossattention.self.{n}.weight"] for n in ("key", "value")])
    assert torch.equal(model.decoder.layers[0].cross_attn.kv.weight, kv)
    qkv = torch.cat([sd[p + f"1.attention.self.{n}.bias"] for n in ("query", "key", "value")])
    assert torch.equal(model.decoder.layers[1].attn.qkv.bias, qkv)
    assert torch.equal(model.decoder.embeddings.word_embeddings.weight,
                       sd["text_decoder.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(model.decoder.head.bias, sd["text_decoder.cls.predictions.bias"])
    assert torch.equal(model.backbone.fusion_encoder.layers[1].ffn.fc2.weight,
                       sd["text_encoder.encoder.layer.3.output.dense.weight"])
    # The decoder's logits are its LM head on its states, tied to its own word embeddings.
    ids = torch.randint(5, 120, (2, 4))
    states, states_mask = torch.randn(2, 5, model_cfg.text.hidden_size), torch.ones(2, 5, dtype=torch.long)
    with torch.no_grad():
        logits = model.decoder(ids, torch.ones_like(ids), states, states_mask)
    assert logits.shape == (2, 4, 120) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_albef_ranking_of_a_loaded_albef_vqa_model_equals_albefs_formula_computed_independently(tmp_path):
    """ALBEF's rank_answer: p(first token) from the first decoding step, its top k, then for each of those
    answers log p(first) - (the decoder's summed token loss over the whole answer, first token included)."""
    model, _, model_cfg = _albef_vqa_model(tmp_path)
    g = torch.Generator().manual_seed(11)
    n_answers, k = 12, 6
    answer_ids = torch.randint(5, 120, (n_answers, 5), generator=g)
    answer_ids[:, 0], answer_ids[:, -1] = 1, 2  # [CLS] ... [SEP]
    answer_ids[:4, 1] = answer_ids[0, 1]  # answers that share their first token
    answer_mask = torch.ones_like(answer_ids)
    answer_mask[::3, 3:] = 0  # shorter answers: [CLS] a b, padded
    answer_ids = answer_ids * answer_mask
    states = torch.randn(4, 5, model_cfg.text.hidden_size, generator=g)
    states_mask = torch.ones(4, 5, dtype=torch.long)
    states_mask[1, 3:] = 0
    best, shortlist, scores = vqa.rank_answers(model.decoder, states, states_mask, answer_ids, answer_mask, k=k,
                                               chunk=5, ranking="albef")
    with torch.no_grad():
        for q in range(4):
            s, m = states[q:q + 1], states_mask[q:q + 1]
            start = model.decoder(answer_ids[:1, :1], torch.ones(1, 1, dtype=torch.long), s, m)[0, 0]
            top_probs, top_ids = torch.softmax(start, -1)[answer_ids[:, 1]].topk(k)
            expected = []
            for prob, a in zip(top_probs, top_ids.tolist(), strict=True):
                ids, mask = answer_ids[a:a + 1], answer_mask[a:a + 1]
                logits = model.decoder(ids, mask, s, m)[0, :-1]
                targets = ids[0, 1:].masked_fill(mask[0, 1:] == 0, -100)
                loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
                expected.append(prob.log() - loss)
            expected = torch.stack(expected)
            assert shortlist[q].tolist() == top_ids.tolist()
            assert torch.allclose(scores[q], expected, atol=1e-4)
            assert best[q] == top_ids[expected.argmax()]
    # Ours scores each token once: the two differ by exactly the first token's log-probability.
    _, shortlist_seq, scores_seq = vqa.rank_answers(model.decoder, states, states_mask, answer_ids, answer_mask,
                                                    k=k, ranking="sequence")
    assert torch.equal(shortlist_seq, shortlist)
    with torch.no_grad():
        start = model.decoder(answer_ids[:1, :1].expand(4, 1), torch.ones(4, 1, dtype=torch.long), states,
                              states_mask)[:, 0]
        first = torch.log_softmax(start, -1)[:, answer_ids[:, 1]].gather(1, shortlist)
    assert torch.allclose(scores - scores_seq, first, atol=1e-4)
    with pytest.raises(ValueError, match="ranking must be 'albef' or 'sequence'"):
        vqa.rank_answers(model.decoder, states, states_mask, answer_ids, answer_mask, k=k, ranking="ALBEF")
