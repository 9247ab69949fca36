"""ALBEF objectives: ITC with momentum distillation, ITM hard negatives, MLM masking and loss, the
feature queue."""

import pytest
import torch
import torch.nn.functional as F

from softmask.objectives.itc import (
    id_positives,
    itc_loss,
    itc_targets,
    one_hot_positives,
    similarities,
    soft_cross_entropy,
)
from softmask.objectives.itm import itm_labels, itm_loss, sample_hard_negatives
from softmask.objectives.mlm import mask_tokens, mlm_loss
from softmask.objectives.queue import FeatureQueue

# --------------------------------------------------------------------------------------------------
# ITC
# --------------------------------------------------------------------------------------------------


def _feats(n, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, e, generator=g), dim=1)


def test_similarities_shapes_and_values():
    img, txt = _feats(3, seed=0), _feats(3, seed=1)
    img_all, txt_all = _feats(7, seed=2), _feats(7, seed=3)
    s_i2t, s_t2i = similarities(img, txt, img_all, txt_all, 0.5)
    assert s_i2t.shape == s_t2i.shape == (3, 7)
    torch.testing.assert_close(s_i2t, img @ txt_all.T / 0.5)
    torch.testing.assert_close(s_t2i, txt @ img_all.T / 0.5)
    temp = torch.tensor(0.07, requires_grad=True)
    similarities(img, txt, img_all, txt_all, temp)[0].sum().backward()
    assert temp.grad is not None


def test_one_hot_and_id_positives():
    pos = one_hot_positives(3, 5, "cpu")
    expected = torch.zeros(3, 5)
    expected[[0, 1, 2], [0, 1, 2]] = 1
    assert torch.equal(pos, expected)
    with pytest.raises(ValueError):
        one_hot_positives(4, 3, "cpu")
    ids = torch.tensor([7, 3, 7])
    all_ids = torch.cat([ids, torch.tensor([3, -1, 7, 9])])
    got = id_positives(ids, all_ids)
    assert got.dtype == torch.float32 and got.shape == (3, 7)
    assert got.tolist() == [
        [1, 0, 1, 0, 0, 1, 0],
        [0, 1, 0, 1, 0, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
    ]


def test_itc_loss_matches_cross_entropy_on_one_hot_targets():
    torch.manual_seed(0)
    s_i2t, s_t2i = torch.randn(4, 10), torch.randn(4, 10)
    s_m = torch.randn(4, 10)
    pos = one_hot_positives(4, 10, "cpu")
    t_i2t, t_t2i = itc_targets(s_m, s_m, pos, alpha=0.0)
    assert torch.equal(t_i2t, pos) and torch.equal(t_t2i, pos)
    loss = itc_loss(s_i2t, s_t2i, t_i2t, t_t2i)
    # by hand: -log(exp(s_ii) / sum_j exp(s_ij)), mean over rows, then the mean of both directions
    def by_hand(s):
        return torch.stack([-(s[i, i] - s[i].exp().sum().log()) for i in range(4)]).mean()

    torch.testing.assert_close(loss, (by_hand(s_i2t) + by_hand(s_t2i)) / 2)
    target = torch.arange(4)
    ref = (F.cross_entropy(s_i2t, target) + F.cross_entropy(s_t2i, target)) / 2
    torch.testing.assert_close(loss, ref)


def test_itc_targets_mix_and_rows_sum_to_one():
    torch.manual_seed(1)
    s_i2t_m, s_t2i_m = torch.randn(3, 6), torch.randn(3, 6)
    pos = id_positives(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 0, 5, 1, 0]))
    t_i2t, t_t2i = itc_targets(s_i2t_m, s_t2i_m, pos.bool(), alpha=0.4)
    for t, s in ((t_i2t, s_i2t_m), (t_t2i, s_t2i_m)):
        assert t.dtype == torch.float32 and not t.requires_grad
        torch.testing.assert_close(t.sum(1), torch.ones(3))
        torch.testing.assert_close(t, 0.4 * s.softmax(1) + 0.6 * pos / pos.sum(1, keepdim=True))
    t1, _ = itc_targets(s_i2t_m, s_t2i_m, pos, alpha=1.0)
    torch.testing.assert_close(t1, s_i2t_m.softmax(1))
    # alpha = 0 ignores the momentum similarities, even broken ones
    t0, _ = itc_targets(torch.full((3, 6), float("nan")), s_t2i_m, pos, alpha=0.0)
    torch.testing.assert_close(t0.sum(1), torch.ones(3))


def test_itc_loss_float32_under_autocast_and_gradients():
    s = torch.randn(4, 6, requires_grad=True)
    t, _ = itc_targets(s.detach(), s.detach(), one_hot_positives(4, 6, "cpu"), 0.4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = itc_loss(s.bfloat16(), s.bfloat16(), t, t)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    torch.testing.assert_close(soft_cross_entropy(s.detach(), t), itc_loss(s.detach(), s.detach(), t, t))


# --------------------------------------------------------------------------------------------------
# Queue
# --------------------------------------------------------------------------------------------------


def test_queue_init_and_wrap_around_with_size_not_a_multiple_of_batch():
    q = FeatureQueue(dim=2, size=5, with_ids=True)
    torch.testing.assert_close(q.feats.norm(dim=1), torch.ones(5))
    assert q.ptr.item() == 0 and q.filled.item() == 0 and q.ids.tolist() == [-1] * 5
    assert not q.filled_mask().any()
    rows = torch.arange(20, dtype=torch.float32).reshape(10, 2)
    q.enqueue(rows[0:3], torch.tensor([0, 1, 2]))
    assert q.ptr.item() == 3 and q.filled.item() == 3
    assert q.filled_mask().tolist() == [True, True, True, False, False]
    q.enqueue(rows[3:6], torch.tensor([3, 4, 5]))
    assert q.ptr.item() == 1 and q.filled.item() == 5
    assert q.ids.tolist() == [5, 1, 2, 3, 4]
    assert torch.equal(q.all(), rows[[5, 1, 2, 3, 4]])
    q.enqueue(rows[6:9], torch.tensor([6, 7, 8]))
    assert q.ptr.item() == 4 and q.filled.item() == 5
    assert q.all_ids().tolist() == [5, 6, 7, 8, 4]


def test_queue_batch_larger_than_size_keeps_the_last_rows():
    q = FeatureQueue(dim=1, size=3, with_ids=True)
    q.enqueue(torch.tensor([[10.0]]), torch.tensor([10]))  # ptr -> 1
    rows = torch.arange(7, dtype=torch.float32).reshape(7, 1)
    q.enqueue(rows, torch.arange(7))
    # writing the 7 rows one by one from slot 1 ends at slot (1 + 7) % 3 = 2 with rows 4, 5, 6 last
    assert q.ptr.item() == 2 and q.filled.item() == 3
    ref = [None] * 3
    for i in range(7):
        ref[(1 + i) % 3] = i
    assert q.ids.tolist() == ref
    assert q.all()[:, 0].tolist() == [float(v) for v in ref]
    assert sorted(ref) == [4, 5, 6]


def test_queue_state_dict_round_trip_and_detach():
    torch.manual_seed(0)
    q = FeatureQueue(dim=4, size=6, with_ids=True)
    feats = torch.randn(4, 4, requires_grad=True)
    q.enqueue(feats * 2, torch.tensor([1, 2, 3, 4]))
    assert not q.feats.requires_grad
    out = q.all()
    assert not out.requires_grad
    out.zero_()  # a copy: the queue is untouched
    assert q.feats.abs().sum() > 0
    state = q.state_dict()
    assert set(state) == {"feats", "ptr", "filled", "ids"}
    q2 = FeatureQueue(dim=4, size=6, with_ids=True)
    q2.load_state_dict(state)
    for name in ("feats", "ptr", "filled", "ids"):
        assert torch.equal(getattr(q2, name), getattr(q, name))
    q.enqueue(torch.ones(3, 4), torch.tensor([5, 6, 7]))
    q2.enqueue(torch.ones(3, 4), torch.tensor([5, 6, 7]))
    assert torch.equal(q.feats, q2.feats) and q2.filled.item() == 6 and q2.ptr.item() == 1
    assert set(FeatureQueue(4, 6).state_dict()) == {"feats", "ptr", "filled"}


def test_queue_argument_errors():
    q = FeatureQueue(dim=3, size=4)
    with pytest.raises(ValueError):
        q.enqueue(torch.zeros(2, 5))
    with pytest.raises(ValueError):
        q.enqueue(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError):
        FeatureQueue(dim=3, size=4, with_ids=True).enqueue(torch.zeros(2, 3))
    q.enqueue(torch.zeros(0, 3))
    assert q.ptr.item() == 0 and q.filled.item() == 0


# --------------------------------------------------------------------------------------------------
# ITM hard negatives
# --------------------------------------------------------------------------------------------------


def test_hard_negatives_never_pick_positive_or_excluded():
    g = torch.Generator().manual_seed(0)
    b = 6
    exclude = torch.zeros(b, b, dtype=torch.bool)
    exclude[0, 1] = exclude[1, 0] = True  # duplicate captions of images 0 and 1
    exclude[2, 5] = True  # asymmetric: image 2 must not get text 5; text 5 must not get image 2
    for _ in range(300):
        sim = torch.randn(b, b, generator=g) * 3
        sim.fill_diagonal_(-10.0)  # make the excluded/positive entries the tempting ones elsewhere
        sim[0, 1] = sim[1, 0] = sim[2, 5] = sim[5, 2] = 50.0
        nt, ni, valid = sample_hard_negatives(sim, sim.T.contiguous(), generator=g, exclude=exclude)
        assert valid.all()
        rows = torch.arange(b)
        assert (nt != rows).all() and (ni != rows).all()
        assert not exclude[rows, nt].any()  # image i with text nt[i]
        assert not exclude[ni, rows].any()  # image ni[i] with text i


def test_hard_negatives_batch_of_one_is_invalid():
    nt, ni, valid = sample_hard_negatives(torch.randn(1, 1), torch.randn(1, 1))
    assert nt.tolist() == [0] and ni.tolist() == [0] and valid.tolist() == [False]
    nt, ni, valid = sample_hard_negatives(torch.zeros(0, 0), torch.zeros(0, 0))
    assert nt.numel() == ni.numel() == valid.numel() == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 3.0])
def test_hard_negatives_degenerate_similarities(value):
    g = torch.Generator().manual_seed(1)
    b = 5
    sim = torch.full((b, b), value)
    for _ in range(50):
        nt, ni, valid = sample_hard_negatives(sim, sim, generator=g)
        assert valid.all()
        assert (nt != torch.arange(b)).all() and (ni != torch.arange(b)).all()
        assert nt.min() >= 0 and nt.max() < b and ni.min() >= 0 and ni.max() < b


def test_hard_negatives_partial_nan_rows_and_underflow():
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(4, 4, generator=g)
    sim[1, 2] = float("nan")  # row 1 falls back to uniform
    sim[3] = torch.tensor([-1e30, -1e30, -1e30, 1e30])  # full softmax underflows off the diagonal
    for _ in range(50):
        nt, ni, valid = sample_hard_negatives(sim, sim.clone(), generator=g)
        assert valid.all() and (nt != torch.arange(4)).all() and (ni != torch.arange(4)).all()


def test_hard_negatives_all_excluded_row_is_invalid():
    b = 4
    sim = torch.randn(b, b)
    exclude = torch.zeros(b, b, dtype=torch.bool)
    exclude[2, :] = True  # image 2 has no negative text
    exclude[:, 2] = True  # text 2 has no negative image
    nt, ni, valid = sample_hard_negatives(sim, sim, exclude=exclude)
    assert valid.tolist() == [True, True, False, True]
    assert nt[2].item() == 2 and ni[2].item() == 2
    ok = valid.nonzero().squeeze(1)
    assert not exclude[ok, nt[ok]].any() and not exclude[ni[ok], ok].any()
    # every row excluded (e.g. all captions identical)
    nt, ni, valid = sample_hard_negatives(sim, sim, exclude=torch.ones(b, b, dtype=torch.bool))
    assert not valid.any() and nt.tolist() == ni.tolist() == list(range(b))


def test_hard_negatives_deterministic_with_generator_and_no_grad():
    sim = torch.randn(8, 8, requires_grad=True)
    a = sample_hard_negatives(sim, sim.T, generator=torch.Generator().manual_seed(42))
    b = sample_hard_negatives(sim, sim.T, generator=torch.Generator().manual_seed(42))
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
        assert not x.requires_grad
    draws = {tuple(sample_hard_negatives(sim, sim.T, generator=torch.Generator().manual_seed(s))[0].tolist())
             for s in range(10)}
    assert len(draws) > 1


@pytest.mark.slow
def test_hard_negatives_follow_the_softmax():
    sim_i2t = torch.tensor([[9.0, 1.0, 0.0], [2.0, 9.0, 0.0], [0.5, 0.5, 9.0]])
    sim_t2i = torch.tensor([[9.0, 0.0, 1.5], [1.0, 9.0, 1.0], [-1.0, 1.0, 9.0]])
    g = torch.Generator().manual_seed(123)
    n = 3000
    counts_t = torch.zeros(3, 3)
    counts_i = torch.zeros(3, 3)
    for _ in range(n):
        nt, ni, valid = sample_hard_negatives(sim_i2t, sim_t2i, generator=g)
        assert valid.all()
        counts_t[torch.arange(3), nt] += 1
        counts_i[torch.arange(3), ni] += 1
    for counts, sim in ((counts_t, sim_i2t), (counts_i, sim_t2i)):
        expected = sim.masked_fill(torch.eye(3, dtype=torch.bool), float("-inf")).softmax(1)
        assert (counts.diag() == 0).all()
        assert (counts / n - expected).abs().max() < 0.04


def test_itm_labels_and_loss():
    labels = itm_labels(2, 3, "cpu")
    assert labels.dtype == torch.long and labels.tolist() == [1, 1, 0, 0, 0]
    logits = torch.randn(5, 2, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = itm_loss(logits.bfloat16(), labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(itm_loss(logits, labels), F.cross_entropy(logits, labels))


# --------------------------------------------------------------------------------------------------
# MLM
# --------------------------------------------------------------------------------------------------

CLS, SEP, PAD, MASK = 1, 2, 0, 3


def _text(b, t, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    lengths = torch.randint(3, t + 1, (b,), generator=g)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids[:, 0] = CLS
    ids[torch.arange(b), lengths - 1] = SEP
    ids[mask == 0] = PAD
    return ids, mask


def test_mask_tokens_never_touches_special_or_padding_and_keeps_input():
    ids, mask = _text(16, 12, 50)
    ids[3, 4] = CLS  # a special id inside the text is never chosen either
    before = ids.clone()
    g = torch.Generator().manual_seed(0)
    masked, labels = mask_tokens(ids, mask, 50, [CLS, SEP, PAD], 0.9, g, MASK)
    assert torch.equal(ids, before)
    special = (ids == CLS) | (ids == SEP) | (ids == PAD) | (mask == 0)
    assert (labels[special] == -100).all()
    assert torch.equal(masked[special], ids[special])
    chosen = labels != -100
    assert chosen.any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(masked[~chosen], ids[~chosen])  # -100 exactly where not chosen


def test_mask_tokens_split_and_rate():
    b, t, vocab = 400, 100, 1000
    ids = torch.randint(5, vocab, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(b, t, dtype=torch.long)
    masked, labels = mask_tokens(ids, mask, vocab, [CLS, SEP, PAD], 0.15,
                                 generator=torch.Generator().manual_seed(2), mask_id=MASK)
    chosen = labels != -100
    n = chosen.sum().item()
    assert abs(n / ids.numel() - 0.15) < 0.01
    to_mask = (masked == MASK) & chosen
    unchanged = (masked == ids) & chosen
    random = chosen & ~to_mask & ~unchanged
    assert abs(to_mask.sum().item() / n - 0.8) < 0.015
    assert abs(unchanged.sum().item() / n - 0.1) < 0.015
    assert abs(random.sum().item() / n - 0.1) < 0.015
    assert masked.min() >= 0 and masked.max() < vocab


def test_mask_tokens_deterministic_and_requires_mask_id():
    ids, mask = _text(8, 10, 40)
    a = mask_tokens(ids, mask, 40, [CLS, SEP, PAD], 0.3, torch.Generator().manual_seed(5), mask_id=MASK)
    b = mask_tokens(ids, mask, 40, [CLS, SEP, PAD], 0.3, torch.Generator().manual_seed(5), mask_id=MASK)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(TypeError):
        mask_tokens(ids, mask, 40, [CLS, SEP, PAD], 0.3)


def test_mlm_loss_without_and_with_teacher():
    torch.manual_seed(3)
    logits, teacher = torch.randn(7, 20), torch.randn(7, 20)
    targets = torch.randint(0, 20, (7,))
    ce = F.cross_entropy(logits, targets)
    torch.testing.assert_close(mlm_loss(logits, targets), ce)
    assert torch.equal(mlm_loss(logits, targets, teacher, alpha=0.0), mlm_loss(logits, targets))
    soft = -(teacher.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(mlm_loss(logits, targets, teacher, alpha=1.0), soft)
    torch.testing.assert_close(mlm_loss(logits, targets, teacher, alpha=0.4), 0.6 * ce + 0.4 * soft)
    student = logits.clone().requires_grad_(True)
    teacher_p = teacher.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mlm_loss(student.bfloat16(), targets, teacher_p.bfloat16(), alpha=0.4)
    assert loss.dtype == torch.float32
    loss.backward()
    assert student.grad is not None and teacher_p.grad is None


def test_mlm_loss_with_no_masked_tokens():
    logits = torch.randn(0, 20, requires_grad=True)
    for teacher, alpha in ((None, 0.0), (torch.randn(0, 20), 0.4)):
        loss = mlm_loss(logits, torch.zeros(0, dtype=torch.long), teacher, alpha)
        assert loss.item() == 0.0 and not torch.isnan(loss) and loss.requires_grad
        loss.backward()
    assert logits.grad is not None


@pytest.mark.parametrize("mask_sep", [True, False])
def test_pretraining_masks_sep_as_albef_does_unless_told_not_to(mask_sep):
    from softmask import create_model
    from softmask.tasks.pretrain import PretrainObjective

    from helpers import tiny_config

    cfg = tiny_config(f"mlm.mask_sep={mask_sep}")
    objective = PretrainObjective(cfg, create_model(cfg.model), {"cls": CLS, "sep": SEP, "pad": PAD, "mask": MASK}, 10)
    assert objective.mlm_excluded == sorted({CLS, PAD} | ({SEP} if not mask_sep else set()))
    # 2,000 captions "[CLS] w w w w [SEP] [PAD] [PAD]": [SEP] is chosen at the MLM rate, or never.
    ids = torch.tensor([[CLS, 10, 11, 12, 13, SEP, PAD, PAD]]).repeat(2000, 1)
    mask = (ids != PAD).long()
    _, labels = mask_tokens(ids, mask, 50, objective.mlm_excluded, 0.15, torch.Generator().manual_seed(0), MASK)
    sep_rate = (labels[:, 5] != -100).float().mean().item()
    assert (abs(sep_rate - 0.15) < 0.03) if mask_sep else sep_rate == 0.0
    assert (labels[:, 0] == -100).all() and (labels[:, 6:] == -100).all()


def test_ema_update_is_the_per_parameter_formula_bit_for_bit():
    from softmask.objectives.distill import ema_update

    torch.manual_seed(0)
    online, target = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5)), torch.nn.Sequential(
        torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
    expected = [t.detach().clone().mul_(0.995).add_(o.detach(), alpha=1.0 - 0.995)
                for o, t in zip(online.parameters(), target.parameters(), strict=True)]
    ema_update(online, target, 0.995)
    assert all(torch.equal(t, e) for t, e in zip(target.parameters(), expected, strict=True))
    assert all(not t.requires_grad or t.grad is None for t in target.parameters())
