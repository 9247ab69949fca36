"""Text-driven soft masks (word choice, normalisation, half-compensation, application) and focal ITC."""

import math

import pytest
import torch

from softmask.data.text import continuation_table, load_tokenizer, special_token_ids, tokenize
from softmask.objectives.itc import (
    focal_itc_loss,
    focal_soft_cross_entropy,
    itc_loss,
    itc_targets,
    one_hot_positives,
    soft_cross_entropy,
)
from softmask.objectives.softmask import (
    apply_soft_mask,
    choose_words,
    half_compensate,
    make_soft_mask,
    normalize_maps,
    word_ids,
)

# --------------------------------------------------------------------------------------------------
# Half-compensation
# --------------------------------------------------------------------------------------------------


def _reference_compensation(row: list[float], ratio: float) -> list[float]:
    """A slow, independent reference: bisection on c in float64 to 1e-12, one row at a time."""
    n = len(row)
    budget = ratio * n
    nonzero = [v for v in row if v > 0]
    if len(nonzero) <= budget:
        fill = (budget - len(nonzero)) / (n - len(nonzero)) if n > len(nonzero) else 0.0
        return [1.0 if v > 0 else fill for v in row]
    total = lambda c: sum(min(c * v, 1.0) for v in row)
    low, high = 0.0, 1.0
    while total(high) < budget:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if total(mid) < budget:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * high:
            break
    c = (low + high) / 2
    return [min(c * v, 1.0) for v in row]


def _check_compensation(g: torch.Tensor, w: torch.Tensor, ratio: float, all_pairs: bool = True) -> None:
    n = g.shape[-1]
    assert w.shape == g.shape and w.dtype == g.dtype
    assert torch.isfinite(w).all()
    assert (w >= 0).all() and (w <= 1).all()
    torch.testing.assert_close(w.double().sum(-1), torch.full((g.shape[0],), ratio * n, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    if all_pairs:  # order kept: g_i >= g_j implies w_i >= w_j (ties stay tied)
        ge = g.unsqueeze(-1) >= g.unsqueeze(-2)
        assert (w.unsqueeze(-1) >= w.unsqueeze(-2))[ge].all()
        eq = g.unsqueeze(-1) == g.unsqueeze(-2)
        assert (w.unsqueeze(-1) == w.unsqueeze(-2))[eq].all()
    else:  # sorting g must sort w
        order = g.argsort(dim=-1, descending=True)
        sorted_w = w.gather(-1, order)
        assert (sorted_w[:, :-1] >= sorted_w[:, 1:]).all()


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (5, 7), (4, 16), (2, 256)])
def test_half_compensate_random_matches_reference(shape, ratio):
    g = normalize_maps(torch.rand(shape, generator=torch.Generator().manual_seed(shape[1])) ** 3)
    w = half_compensate(g, ratio)
    _check_compensation(g, w, ratio, all_pairs=shape[1] <= 16)
    for row, got in zip(g.double().tolist(), w.double(), strict=True):
        ref = torch.tensor(_reference_compensation(row, ratio), dtype=torch.float64)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_half_compensate_special_rows(dtype):
    n = 10
    one_hot = torch.zeros(n, dtype=dtype)
    one_hot[3] = 1
    two_hot = torch.zeros(n, dtype=dtype)
    two_hot[[1, 8]] = torch.tensor([1.0, 0.2], dtype=dtype)
    saturated = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0.5, 0.2, 0], dtype=dtype)  # many equal maxima
    ties = torch.tensor([0.5, 0.5, 0.5, 1, 1, 0.5, 0, 0, 0.25, 0.25], dtype=dtype)
    five_hot = (torch.arange(n) % 2 == 0).to(dtype)  # exactly N/2 non-zero entries
    rows = torch.stack([torch.zeros(n, dtype=dtype), normalize_maps(torch.full((1, n), 3.0, dtype=dtype))[0],
                        one_hot, two_hot, saturated, ties, five_hot, torch.ones(n, dtype=dtype)])
    for ratio in (0.3, 0.5, 0.7):
        w = half_compensate(rows, ratio)
        _check_compensation(rows, w, ratio)
        for row, got in zip(rows.double().tolist(), w.double(), strict=True):
            ref = torch.tensor(_reference_compensation(row, ratio), dtype=torch.float64)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    w = half_compensate(rows, 0.5)
    torch.testing.assert_close(w[0], torch.full((n,), 0.5, dtype=dtype))  # all zeros -> spread evenly
    torch.testing.assert_close(w[1], torch.full((n,), 0.5, dtype=dtype))  # constant -> zeros -> even
    assert w[2, 3] == 1 and torch.allclose(w[2, torch.arange(n) != 3], torch.tensor(4 / 9, dtype=dtype))
    assert torch.equal(w[6], five_hot)  # the N/2 non-zero entries saturate, the rest stay 0
    torch.testing.assert_close(w[4], saturated * 5 / 7.7)  # no clip needed: c = R / sum(g)


def test_half_compensate_exact_saturation_and_nan():
    g = torch.tensor([[1.0, 0.1, 0.1, 0.1, 0.0, 0.0]])
    w = half_compensate(g, 0.5)  # R = 3: c = 2 / 0.3, the top entry saturates
    torch.testing.assert_close(w, torch.tensor([[1.0, 2 / 3, 2 / 3, 2 / 3, 0.0, 0.0]]))
    nan = torch.tensor([[float("nan"), 1.0, 0.5, 0.0]])
    w = half_compensate(nan, 0.5)
    assert torch.isfinite(w).all() and abs(w.sum().item() - 2) < 1e-5
    with pytest.raises(ValueError, match="ratio"):
        half_compensate(g, 1.5)
    assert half_compensate(torch.zeros(2, 0)).shape == (2, 0)


def test_normalize_maps():
    maps = torch.tensor([[2.0, 4.0, 3.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.0], [float("nan"), 1.0, 2.0]])
    out = normalize_maps(maps)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 1.0, 0.5]))
    assert torch.equal(out[1:], torch.zeros(3, 3))
    assert normalize_maps(maps.double()).dtype == torch.float64


def test_make_soft_mask_is_detached_and_sums():
    maps = torch.rand(4, 16, generator=torch.Generator().manual_seed(0), requires_grad=True)
    mask = make_soft_mask(maps * 2, 0.5)
    assert not mask.requires_grad and mask.grad_fn is None
    assert (mask >= 0).all() and (mask <= 1).all()
    torch.testing.assert_close(mask.sum(-1), torch.full((4,), 8.0), atol=1e-4, rtol=0)
    # the most relevant patch is masked the most
    assert torch.equal(mask.argmin(-1), maps.argmax(-1))
    torch.testing.assert_close(make_soft_mask(torch.zeros(1, 4), 0.3), torch.full((1, 4), 0.7))


def test_apply_soft_mask_gradients():
    embeds = torch.randn(2, 5, 3, requires_grad=True)
    mask = torch.rand(2, 4, requires_grad=True)
    out = apply_soft_mask(embeds, mask)
    assert out.shape == embeds.shape
    assert torch.equal(out[:, 0], embeds[:, 0])
    torch.testing.assert_close(out[:, 1:], embeds[:, 1:] * mask.unsqueeze(-1))
    out.sum().backward()
    assert mask.grad is None  # no path to the mask
    torch.testing.assert_close(embeds.grad[:, 0], torch.ones(2, 3))
    torch.testing.assert_close(embeds.grad[:, 1:], mask.detach().unsqueeze(-1).expand(2, 4, 3))
    with pytest.raises(RuntimeError):
        torch.autograd.grad(apply_soft_mask(embeds, mask).sum(), mask)
    with pytest.raises(ValueError, match="mask"):
        apply_soft_mask(embeds, torch.ones(2, 5))


# --------------------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    tokenizer = load_tokenizer()
    ids = special_token_ids(tokenizer)
    return tokenizer, continuation_table(tokenizer.get_vocab()), ids


def _special(ids):
    return [ids["cls"], ids["sep"], ids["pad"]]


def test_continuation_table(tok):
    tokenizer, table, _ = tok
    assert table.dtype == torch.bool and table.shape == (len(tokenizer.get_vocab()),)
    assert table[tokenizer.token_to_id("##s")] and not table[tokenizer.token_to_id("dog")]
    assert continuation_table({"a": 0, "##b": 2}).tolist() == [False, False, True]


def test_word_ids_groups_pieces(tok):
    tokenizer, table, ids = tok
    clean, attn = tokenize(tokenizer, ["a man skateboarding down giraffes", "dogs"])
    tokens = [tokenizer.id_to_token(i) for i in clean[0].tolist()]
    assert tokens == ["[CLS]", "a", "man", "skate", "##boarding", "down", "gi", "##raf", "##fe", "##s", "[SEP]"]
    words = word_ids(clean, attn, table, _special(ids))
    assert words[0].tolist() == [-1, 0, 1, 2, 2, 3, 4, 4, 4, 4, -1]
    assert words[1].tolist() == [-1, 0, -1] + [-1] * 8  # [PAD] and padding are -1
    # a continuation piece with no word before it starts word 0
    odd = torch.tensor([[ids["cls"], tokenizer.token_to_id("##s"), tokenizer.token_to_id("##s"), ids["sep"]]])
    assert word_ids(odd, torch.ones_like(odd), table, _special(ids)).tolist() == [[-1, 0, 0, -1]]


def test_choose_words_multi_piece_mean_and_mask(tok):
    tokenizer, table, ids = tok
    clean, attn = tokenize(tokenizer, ["skateboarding", "giraffes", "[CLS]", "a dog"])
    b, t = clean.shape
    maps = torch.arange(b * t * 3, dtype=torch.float32).reshape(b, t, 3)
    seen = clean.clone()
    seen[1, 2] = ids["mask"]  # "##raf" was masked: the word's map is the mean of gi, ##fe, ##s
    seen[3, 1] = ids["mask"]  # "a" masked: only "dog" is eligible
    word_maps, has_word, chosen = choose_words(maps, clean, seen, attn, table, _special(ids), ids["mask"],
                                               torch.Generator().manual_seed(0))
    assert has_word.tolist() == [True, True, False, True]
    torch.testing.assert_close(word_maps[0], maps[0, 1:3].mean(0))
    assert chosen[0].tolist() == [False, True, True] + [False] * (t - 3)
    torch.testing.assert_close(word_maps[1], maps[1, [1, 3, 4]].mean(0))
    assert chosen[1].nonzero().flatten().tolist() == [1, 3, 4]
    assert torch.equal(word_maps[2], torch.zeros(3)) and not chosen[2].any()
    torch.testing.assert_close(word_maps[3], maps[3, 2])
    # a caption made only of special tokens, and one where every word is masked
    only_special = torch.tensor([[ids["cls"], ids["sep"], ids["pad"]]])
    seen_all_masked = torch.tensor([[ids["cls"], ids["mask"], ids["sep"]]])
    clean2 = torch.tensor([[ids["cls"], tokenizer.token_to_id("dog"), ids["sep"]]])
    for c, s in ((only_special, only_special), (clean2, seen_all_masked)):
        nan_maps = torch.full((1, 3, 2), float("nan"))
        wm, hw, ch = choose_words(nan_maps, c, s, torch.tensor([[1, 1, 0]]), table, _special(ids), ids["mask"])
        assert not hw.item() and not ch.any() and torch.equal(wm, torch.zeros(1, 2))


def test_choose_words_uniform_and_deterministic(tok):
    tokenizer, table, ids = tok
    clean, attn = tokenize(tokenizer, ["a man skateboarding down giraffes"] * 4000)
    maps = torch.rand(1, clean.shape[1], 4).expand(4000, -1, -1)
    args = (maps, clean, clean, attn, table, _special(ids), ids["mask"])
    _, has_word, chosen = choose_words(*args, generator=torch.Generator().manual_seed(1))
    assert has_word.all()
    words = word_ids(clean, attn, table, _special(ids))
    picked = torch.where(chosen, words, -1).amax(dim=1)  # the chosen word of each row
    # every row picks exactly the tokens of one word
    assert torch.equal(chosen, (words == picked.unsqueeze(1)))
    counts = torch.bincount(picked, minlength=5)
    assert counts.numel() == 5 and ((counts - 800).abs() < 120).all(), counts  # 5 words, 800 each expected
    again = choose_words(*args, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[2], chosen)
    other = choose_words(*args, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(other[2], chosen)


# --------------------------------------------------------------------------------------------------
# Focal ITC
# --------------------------------------------------------------------------------------------------


def _itc_inputs(seed=0, b=3, k=5):
    g = torch.Generator().manual_seed(seed)
    sim_i2t, sim_t2i = torch.randn(b, k, generator=g) * 3, torch.randn(b, k, generator=g) * 3
    pos = one_hot_positives(b, k)
    t_i2t, t_t2i = itc_targets(torch.randn(b, k, generator=g), torch.randn(b, k, generator=g), pos, 0.4)
    return sim_i2t, sim_t2i, t_i2t, t_t2i, pos


def test_focal_gamma_zero_is_itc_exactly():
    sim_i2t, sim_t2i, t_i2t, t_t2i, pos = _itc_inputs()
    for mode in ("all", "positive"):
        got = focal_itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, 0.0, mode, positives=pos)
        assert torch.equal(got, itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i))
        assert torch.equal(focal_soft_cross_entropy(sim_i2t, t_i2t, 0, mode), soft_cross_entropy(sim_i2t, t_i2t))


def test_focal_hand_computed_gamma_two():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p = (1/4, 3/4)
    targets = torch.tensor([[0.25, 0.75]])
    pos = torch.tensor([[False, True]])
    lp0, lp1 = math.log(0.25), math.log(0.75)
    every = -(0.25 * 0.75**2 * lp0 + 0.75 * 0.25**2 * lp1)
    positive_only = -(0.25 * lp0 + 0.75 * 0.25**2 * lp1)
    torch.testing.assert_close(focal_soft_cross_entropy(logits, targets, 2.0), torch.tensor(every))
    torch.testing.assert_close(focal_soft_cross_entropy(logits, targets, 2.0, "positive", pos),
                               torch.tensor(positive_only))
    # two directions, two rows: the mean of the rows, then of the directions
    logits2 = torch.tensor([[math.log(3.0), 0.0]])  # p = (3/4, 1/4), one-hot target on column 0
    one_hot = torch.tensor([[1.0, 0.0]])
    second = -(0.25**2 * math.log(0.75))
    got = focal_itc_loss(torch.cat([logits, logits2]), logits2.expand(2, 2), torch.cat([targets, one_hot]),
                         one_hot.expand(2, 2), 2.0)
    torch.testing.assert_close(got, torch.tensor(((every + second) / 2 + second) / 2))


def test_focal_gradients_and_errors():
    sim_i2t, sim_t2i, t_i2t, t_t2i, pos = _itc_inputs(seed=3)
    for mode, gamma in (("all", 2.0), ("positive", 2.0), ("all", 0.5)):
        a, b = sim_i2t.clone().requires_grad_(), sim_t2i.clone().requires_grad_()
        loss = focal_itc_loss(a, b, t_i2t, t_t2i, gamma, mode, positives=pos)
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    # a saturated row (p = 1 exactly) keeps finite gradients, also for gamma < 1
    sat = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    focal_soft_cross_entropy(sat, torch.tensor([[1.0, 0.0, 0.0]]), 0.5).backward()
    assert torch.isfinite(sat.grad).all()
    # the focal loss is smaller than the plain one and bf16 logits are computed in float32
    assert focal_itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, 2.0) < itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i)
    assert focal_itc_loss(sim_i2t.bfloat16(), sim_t2i.bfloat16(), t_i2t, t_t2i, 2.0).dtype == torch.float32
    with pytest.raises(ValueError, match="positives"):
        focal_itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, 2.0, "positive")
    with pytest.raises(ValueError, match="mode"):
        focal_itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, 2.0, "negative")
    with pytest.raises(ValueError, match="gamma"):
        focal_itc_loss(sim_i2t, sim_t2i, t_i2t, t_t2i, -1.0)
