"""Retrieval metrics on hand-built score matrices, and the fast evaluation against a plain one."""

import numpy as np
import pytest
import torch

from softmask.eval.retrieval import candidate_pairs, evaluate_retrieval, recall_at_k

from helpers import load_benchmark, tiny_model_config


def test_recall_on_a_known_matrix():
    # 3 images, 6 captions (2 per image). Image 0's best caption is its own; image 1's own captions
    # rank 2nd and 3rd; image 2's own captions are last.
    text_to_image = np.array([0, 0, 1, 1, 2, 2])
    i2t = np.array([[9, 1, 2, 3, 4, 5],
                    [9, 1, 8, 7, 0, 0],
                    [9, 8, 7, 6, 1, 0]], dtype=float)
    t2i = i2t.T.copy()
    m = recall_at_k(i2t, t2i, text_to_image, ks=(1, 2))
    assert m["tr1"] == pytest.approx(100 / 3) and m["tr2"] == pytest.approx(200 / 3)
    # captions -> images: caption 0 (img 0): scores [9, 9, 9]: a tie, counted against -> rank 2.
    # caption 1 (img 0): [1, 1, 8] -> rank 1 (tie with img 1 counts against); caption 2 (img 1): [2, 8, 7]
    # -> rank 0; caption 3 (img 1): [3, 7, 6] -> 0; caption 4 (img 2): [4, 0, 1] -> 2; caption 5: [5, 0, 0] -> 2.
    assert m["ir1"] == pytest.approx(100 * 2 / 6) and m["ir2"] == pytest.approx(100 * 3 / 6)


def test_constant_scores_give_no_credit():
    m = recall_at_k(np.zeros((4, 4)), np.zeros((4, 4)), np.arange(4))
    assert m["tr1"] == m["ir1"] == 0.0 and m["tr5"] == 100.0  # 4 candidates: rank 3 < 5


def test_perfect_scores():
    m = recall_at_k(np.eye(5), np.eye(5), np.arange(5))
    assert all(m[k] == 100.0 for k in ("tr1", "tr5", "tr10", "ir1", "ir5", "ir10", "r_mean"))


def test_candidate_pairs_are_the_union_without_duplicates():
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    pairs = {tuple(p) for p in candidate_pairs(sim, 1, 1).tolist()}
    assert pairs == {(0, 0), (1, 1), (0, 2)}
    assert len(candidate_pairs(sim, 3, 2)) == 6


def _plain_retrieval(model, pixels, ids, mask, text_to_image, k):
    """Per-query re-ranking written the straightforward way (ALBEF's loop), for comparison."""
    with torch.no_grad():
        image_embeds = model.encode_image(pixels)
        text_embeds = model.encode_text(ids, mask)
        sim = model.image_feat(image_embeds) @ model.text_feat(text_embeds, mask).T
        i2t = np.full(sim.shape, -np.inf)
        t2i = np.full(sim.T.shape, -np.inf)
        for i in range(sim.shape[0]):
            top = sim[i].topk(k).indices
            fused = model.fuse(text_embeds[top], mask[top], image_embeds[i:i + 1].expand(len(top), -1, -1))
            i2t[i, top.numpy()] = model.itm_logits(fused)[:, 1].numpy()
        for c in range(sim.shape[1]):
            top = sim[:, c].topk(k).indices
            fused = model.fuse(text_embeds[c:c + 1].expand(len(top), -1, -1), mask[c:c + 1].expand(len(top), -1),
                               image_embeds[top])
            t2i[c, top.numpy()] = model.itm_logits(fused)[:, 1].numpy()
    return recall_at_k(i2t, t2i, text_to_image), i2t, t2i


def test_fast_equals_plain():
    from softmask import create_model

    torch.manual_seed(0)
    model = create_model(tiny_model_config()).eval()
    pixels = torch.randn(6, 3, 32, 32)
    ids = torch.randint(5, 120, (12, 7))
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[::3, 5:] = 0
    ids[9], mask[9] = ids[1], mask[1]  # the same caption for two images (as "A green diamond." in the world)
    ids[6, 5:] = 77  # behind the mask: still caption 0's tokens
    ids[6, :5] = ids[0, :5]
    text_to_image = np.repeat(np.arange(6), 2)
    fused_rows = []
    fuse = model.fuse
    model.fuse = lambda text, mask, *args, **kw: fused_rows.append(len(text)) or fuse(text, mask, *args, **kw)
    fast = evaluate_retrieval(model, pixels, ids, mask, text_to_image, k=3, batch_size=5)
    model.fuse = fuse
    plain, i2t, t2i = _plain_retrieval(model, pixels, ids, mask, text_to_image, k=3)
    assert fast.metrics == plain
    assert np.allclose(fast.i2t, i2t, atol=1e-5) and np.allclose(fast.t2i, t2i, atol=1e-5)
    # An image is fused once with each distinct caption among its candidates.
    pairs = candidate_pairs(torch.from_numpy(fast.itc), 3, 3)
    canonical = {(i, {6: 0, 9: 1}.get(c, c)) for i, c in pairs.tolist()}
    assert sum(fused_rows) == len(canonical) < len(pairs)


def test_first_of_equal_rows():
    from softmask.eval.retrieval import first_of_equal_rows

    rows = torch.tensor([[3, 4], [5, 6], [3, 4], [7, 8], [5, 6], [3, 4]])
    assert first_of_equal_rows(rows).tolist() == [0, 1, 0, 3, 1, 0]
    assert first_of_equal_rows(rows[:0]).tolist() == []


@pytest.mark.slow
def test_retrieval_benchmark_script_runs(capsys):
    import json

    bench = load_benchmark("retrieval_eval.py")
    assert bench.main(["--images", "12", "--k", "3", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["recalls_equal"] is True and result["captions"] == 60 and result["speedup"] > 0
