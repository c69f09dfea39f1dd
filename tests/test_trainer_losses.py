"""Loss identities against closed-form values, and the sampled estimator's gradient against the analytic one."""

from __future__ import annotations

import math

import pytest
import torch
from closed_forms import float64, rand_lp  # noqa: F401 (float64: a fixture, used by every test here)

from trainer import losses as L

pytestmark = pytest.mark.usefixtures("float64")


def lp(*probs):
    return torch.tensor(probs).log()


def test_kl_by_hand():
    p, q = [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]
    by_hand = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    assert L.kl_divergence(lp(*p), lp(*q)).item() == pytest.approx(by_hand, rel=1e-12)
    # 0 log 0 = 0, also when q is 0 there; and KL to a distribution missing p's support is infinite
    assert L.kl_divergence(lp(0.0, 1.0), lp(0.0, 1.0)).item() == 0.0
    assert L.kl_divergence(lp(0.5, 0.5), lp(0.0, 1.0)).item() == math.inf


def test_zero_for_identical_distributions_every_loss():
    s = rand_lp(2, 3, 11, seed=1)
    mask = torch.ones(2, 3)
    ids = s.topk(4, dim=-1).indices
    topk = s.gather(-1, ids)
    sampled = torch.randint(0, 11, (2, 3))
    for fn in (L.reverse_kl_full, L.forward_kl_full):
        assert fn(s, s, mask).item() == pytest.approx(0.0, abs=1e-12)
    for fn in (L.reverse_kl_topk, L.forward_kl_topk, L.jsd_topk):
        assert fn(s, ids, topk, mask).item() == pytest.approx(0.0, abs=1e-9)
    tb = L.TeacherBatch(s.gather(-1, sampled[..., None]).squeeze(-1))
    assert L.compute_loss("reverse_kl_sampled", s, sampled, tb, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert L.sampled_kl_estimate(tb.token_lp_BT, tb.token_lp_BT, mask).item() == 0.0


def test_full_kls_match_a_loop_by_hand_and_reductions():
    s, t = rand_lp(2, 3, 5, seed=2), rand_lp(2, 3, 5, seed=3)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    per = torch.zeros(2, 3)
    for b in range(2):
        for i in range(3):
            ps, pt = s[b, i].exp().tolist(), t[b, i].exp().tolist()
            per[b, i] = sum(a * math.log(a / c) for a, c in zip(ps, pt, strict=True)) * mask[b, i]
    got = L.reverse_kl_full(s, t, mask, reduction="none")
    assert got.shape == (2, 3)
    torch.testing.assert_close(got, per)
    assert L.reverse_kl_full(s, t, mask, reduction="sum").item() == pytest.approx(per.sum().item())
    assert L.reverse_kl_full(s, t, mask, reduction="mean").item() == pytest.approx(per.sum().item() / 3)
    fwd = L.forward_kl_full(s, t, mask, reduction="none")
    torch.testing.assert_close(fwd, L.reverse_kl_full(t, s, mask, reduction="none"))
    with pytest.raises(ValueError, match="reduction"):
        L.reverse_kl_full(s, t, mask, reduction="avg")


def test_padded_positions_contribute_nothing_even_if_garbage():
    s = rand_lp(1, 2, 4, seed=4).requires_grad_()
    t = rand_lp(1, 2, 4, seed=5).clone()
    t[0, 1] = torch.tensor([0.0, -math.inf, -math.inf, -math.inf])  # infinite KL at a padded position
    mask = torch.tensor([[1.0, 0.0]])
    loss = L.reverse_kl_full(s, t, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(L.kl_divergence(s[0, 0], t[0, 0]).item())


def test_jsd_symmetric_at_half_bounded_by_log2_and_endpoints():
    s, t = rand_lp(4, 7, seed=6), rand_lp(4, 7, seed=7)
    j = L.generalized_jsd(s, t, 0.5)
    torch.testing.assert_close(j, L.generalized_jsd(t, s, 0.5))
    assert (j > 0).all() and (j <= math.log(2) + 1e-12).all()
    # by hand for one row: M = (P + Q) / 2
    p, q = s[0].exp(), t[0].exp()
    m = (p + q) / 2
    by_hand = 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()
    assert j[0].item() == pytest.approx(by_hand.item(), rel=1e-10)
    # disjoint supports: exactly log 2
    assert L.generalized_jsd(lp(1.0, 0.0), lp(0.0, 1.0), 0.5).item() == pytest.approx(math.log(2))
    torch.testing.assert_close(L.generalized_jsd(s, t, 0.0), L.kl_divergence(t, s))
    torch.testing.assert_close(L.generalized_jsd(s, t, 1.0), L.kl_divergence(s, t))
    # generalized: beta weights the teacher's side: JSD_beta(s, t) = JSD_{1-beta}(t, s)
    torch.testing.assert_close(L.generalized_jsd(s, t, 0.3), L.generalized_jsd(t, s, 0.7))


def test_topk_tail_bucket_exact_when_k_is_vocab():
    V = 9
    s, t = rand_lp(2, 3, V, seed=8), rand_lp(2, 3, V, seed=9)
    mask = torch.ones(2, 3)
    ids = t.argsort(dim=-1, descending=True)  # k = V, in the teacher's order
    t_k = t.gather(-1, ids)
    torch.testing.assert_close(
        L.reverse_kl_topk(s, ids, t_k, mask, "none"), L.reverse_kl_full(s, t, mask, "none")
    )
    torch.testing.assert_close(
        L.forward_kl_topk(s, ids, t_k, mask, "none"), L.forward_kl_full(s, t, mask, "none")
    )
    jsd_full = L.masked_reduce(L.generalized_jsd(s, t, 0.5), mask, "none")
    torch.testing.assert_close(L.jsd_topk(s, ids, t_k, mask, 0.5, "none"), jsd_full)


def test_topk_buckets_hold_the_tail_mass_and_lower_bound_the_kl():
    V, K = 12, 3
    s, t = rand_lp(2, 4, V, seed=10), rand_lp(2, 4, V, seed=11)
    ids = t.topk(K, dim=-1).indices
    sb, tb = L.bucket_topk(s, ids, t.gather(-1, ids))
    assert sb.shape == tb.shape == (2, 4, K + 1)
    torch.testing.assert_close(sb.exp().sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(tb.exp().sum(-1), torch.ones(2, 4))
    # tail of each side by hand
    in_k = torch.zeros(2, 4, V, dtype=torch.bool).scatter_(-1, ids, True)
    torch.testing.assert_close(sb[..., -1].exp(), (s.exp() * ~in_k).sum(-1))
    torch.testing.assert_close(tb[..., -1].exp(), (t.exp() * ~in_k).sum(-1))
    mask = torch.ones(2, 4)
    # merging outcomes never increases a KL (data processing inequality)
    assert (
        L.reverse_kl_topk(s, ids, t.gather(-1, ids), mask, "none")
        <= L.reverse_kl_full(s, t, mask, "none") + 1e-12
    ).all()
    assert (
        L.forward_kl_topk(s, ids, t.gather(-1, ids), mask, "none")
        <= L.forward_kl_full(s, t, mask, "none") + 1e-12
    ).all()


def test_topk_teacher_tail_rounding_to_zero_stays_finite():
    s = rand_lp(1, 1, 6, seed=12).requires_grad_()
    ids = torch.tensor([[[0, 1]]])
    t_k = torch.tensor([[[math.log(0.7), math.log(0.3) + 1e-9]]])  # top-2 mass rounds to >= 1
    loss = L.reverse_kl_topk(s, ids, t_k, torch.ones(1, 1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def analytic_reverse_kl_grad(theta, q_lp):
    theta = theta.clone().requires_grad_()
    L.kl_divergence(torch.log_softmax(theta, -1), q_lp).backward()
    return theta.grad


def test_sampled_estimator_gradient_is_the_reverse_kl_gradient_in_expectation():
    g = torch.Generator().manual_seed(13)
    V = 6
    theta = torch.randn(V, generator=g)
    q_lp = torch.log_softmax(torch.randn(V, generator=g) * 1.5, -1)
    want = analytic_reverse_kl_grad(theta, q_lp)

    # Exact expectation: weight each outcome's estimator gradient by its probability.
    th = theta.clone().requires_grad_()
    s_lp = torch.log_softmax(th, -1)
    p = s_lp.exp().detach()
    per_outcome = L.reverse_kl_sampled(s_lp[None], q_lp[None], torch.ones(1, V), reduction="none")[0]
    (p * per_outcome).sum().backward()
    torch.testing.assert_close(th.grad, want, rtol=1e-10, atol=1e-12)

    # Monte Carlo: N sampled tokens, the estimator's mean gradient within 4 standard errors of the analytic one.
    N = 200_000
    x = torch.multinomial(p, N, replacement=True, generator=g)
    # Each sample's gradient depends only on its outcome: autograd of the loss once per outcome, then look up.
    per_outcome_grad = torch.stack(
        [
            torch.autograd.grad(
                L.reverse_kl_sampled(
                    torch.log_softmax(th := theta.clone().requires_grad_(), -1)[v].view(1, 1),
                    q_lp[v].view(1, 1),
                    torch.ones(1, 1),
                    "sum",
                ),
                th,
            )[0]
            for v in range(V)
        ]
    )  # (V outcomes, V logits)
    per_token = per_outcome_grad[x]  # (N, V)
    s_lp = torch.log_softmax(theta, -1)
    mean, se = per_token.mean(0), per_token.std(0) / math.sqrt(N)
    assert ((mean - want).abs() <= 4 * se + 1e-9).all(), (mean, want, se)
    assert (want.abs() > 10 * se).any()  # the test has power: the gradient is far from 0 at this noise
    # ... and its value's Monte-Carlo twin estimates the KL itself
    est = L.sampled_kl_estimate(s_lp[x][None].detach(), q_lp[x][None], torch.ones(1, N)).item()
    assert est == pytest.approx(L.kl_divergence(s_lp.detach(), q_lp).item(), abs=0.02)


def test_sampled_estimator_has_no_gradient_through_the_advantage():
    s_tok = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    t_tok = torch.tensor([[-1.5, -0.5]])
    L.reverse_kl_sampled(s_tok, t_tok, torch.ones(1, 2), reduction="sum").backward()
    # d/ds of -(t - s).detach() * s = -(t - s)
    torch.testing.assert_close(s_tok.grad, -(t_tok - s_tok.detach()))


def test_compute_loss_dispatch_and_needs():
    s = rand_lp(1, 2, 5, seed=14)
    t = rand_lp(1, 2, 5, seed=15)
    ids = t.topk(2, -1).indices
    mask = torch.ones(1, 2)
    tb = L.TeacherBatch(torch.zeros(1, 2), ids, t.gather(-1, ids), t)
    sampled = torch.zeros(1, 2, dtype=torch.long)
    assert L.compute_loss("reverse_kl_full", s, sampled, tb, mask).item() == pytest.approx(
        L.reverse_kl_full(s, t, mask).item()
    )
    assert L.compute_loss("jsd_topk", s, sampled, tb, mask, beta=0.2).item() == pytest.approx(
        L.jsd_topk(s, ids, t.gather(-1, ids), mask, 0.2).item()
    )
    assert L.compute_loss("reverse_kl_sampled", s, sampled, tb, mask).item() == pytest.approx(
        L.reverse_kl_sampled(s[..., 0], tb.token_lp_BT, mask).item()
    )
    assert [L.LOSSES[n].need for n in ("reverse_kl_sampled", "jsd_topk", "forward_kl_full")] == [
        L.Need.TOKEN,
        L.Need.TOPK,
        L.Need.FULL,
    ]
    with pytest.raises(ValueError, match="`loss` must be one of"):
        L.compute_loss("kl", s, sampled, tb, mask)


def test_every_loss_of_the_table_is_zero_for_a_perfect_student_and_reduces():
    t = rand_lp(2, 3, 6, seed=16)
    ids = t.topk(6, -1).indices  # K = V: no tail bucket, so every row can be exactly zero
    sampled = t.argmax(-1)
    tb = L.TeacherBatch(t.gather(-1, sampled.unsqueeze(-1)).squeeze(-1), ids, t.gather(-1, ids), t)
    tb.cand_ids_BTC, tb.cand_lp_BTC = ids, t.gather(-1, ids)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for name, row in L.LOSSES.items():
        assert isinstance(row.need, L.Need) and row.help, name
        assert L.compute_loss(name, t, sampled, tb, mask, reduction="none").shape == (2, 3), name
        if row.need == L.Need.NONE:  # supervised: no teacher to match, the same value without one
            assert (
                L.compute_loss(name, t, sampled, None, mask).item()
                == L.compute_loss(name, t, sampled, tb, mask).item()
            )
            continue
        assert L.compute_loss(name, t, sampled, tb, mask).item() == pytest.approx(0.0, abs=1e-6), name


def test_nll_is_torch_cross_entropy_of_the_rollout_tokens():
    torch.manual_seed(17)
    logits = torch.randn(3, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] + [0.0] * 4])
    s_lp = torch.log_softmax(logits, -1)
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none")  # (B, T)
    keep = mask.bool()
    got = {r: L.compute_loss("nll", s_lp, ids, None, mask, reduction=r) for r in L.REDUCTIONS}
    want_mean = torch.nn.functional.cross_entropy(logits[keep], ids[keep])
    torch.testing.assert_close(got["mean"], want_mean)
    torch.testing.assert_close(got["sum"], per_token[keep].sum())
    torch.testing.assert_close(got["none"], per_token * mask)
    (g,) = torch.autograd.grad(got["mean"], logits)
    (g_want,) = torch.autograd.grad(want_mean, logits)
    torch.testing.assert_close(g, g_want)
    assert L.LOSSES["nll"].need == L.Need.NONE
