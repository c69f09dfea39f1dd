"""`reverse_kl_candidates` (the student's top-C ids plus a tail bucket) against closed forms, and a short
training run that asks the in-process teacher for the student's own candidates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from closed_forms import float64, rand_lp  # noqa: F401 (float64: a fixture, used by every test here)

from trainer import losses as L
from trainer.teacher_io import build_requests, to_teacher_batch

pytestmark = pytest.mark.usefixtures("float64")


def test_by_hand_two_candidates_and_a_tail():
    """V = 4, C = 2: student (0.5, 0.3, 0.1, 0.1), teacher uniform, candidates {0, 1}: buckets
    s = (0.5, 0.3, 0.2), t = (0.25, 0.25, 0.5)."""
    s = torch.tensor([0.5, 0.3, 0.1, 0.1]).log().view(1, 1, 4)
    t = torch.full((1, 1, 4), math.log(0.25))
    ids = torch.tensor([[[0, 1]]])
    want = 0.5 * math.log(0.5 / 0.25) + 0.3 * math.log(0.3 / 0.25) + 0.2 * math.log(0.2 / 0.5)
    got = L.reverse_kl_candidates(s, ids, t.gather(-1, ids), torch.ones(1, 1))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_all_ids_as_candidates_is_reverse_kl_full_values_and_gradients():
    logits = torch.randn(2, 3, 9, generator=torch.Generator().manual_seed(4), requires_grad=True)
    s = torch.log_softmax(logits, -1)
    t = rand_lp(2, 3, 9, seed=5)
    ids = torch.stack([torch.randperm(9, generator=torch.Generator().manual_seed(i)) for i in range(6)])
    ids = ids.view(2, 3, 9)  # every id, in a different order per position
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    for r in L.REDUCTIONS:
        cand = L.reverse_kl_candidates(s, ids, t.gather(-1, ids), mask, r)
        full = L.reverse_kl_full(s, t, mask, r)
        torch.testing.assert_close(cand, full)
    (g_cand,) = torch.autograd.grad(L.reverse_kl_candidates(s, ids, t.gather(-1, ids), mask), logits)
    s = torch.log_softmax(logits, -1)
    (g_full,) = torch.autograd.grad(L.reverse_kl_full(s, t, mask), logits)
    torch.testing.assert_close(g_cand, g_full)


def test_a_lower_bound_of_the_exact_kl_equal_at_c_equals_v():
    s, t = rand_lp(3, 4, 20, seed=6), rand_lp(3, 4, 20, seed=7)
    mask = torch.ones(3, 4)
    full = L.reverse_kl_full(s, t, mask, "none")
    for C in (1, 4, 10, 19):
        ids = s.topk(C, -1).indices  # the student's own top-C, as the trainer sends
        cand = L.reverse_kl_candidates(s, ids, t.gather(-1, ids), mask, "none")
        assert (cand <= full + 1e-12).all() and (cand < full).any(), C
    ids = s.topk(20, -1).indices
    torch.testing.assert_close(L.reverse_kl_candidates(s, ids, t.gather(-1, ids), mask, "none"), full)


def test_masked_positions_are_zero_and_nan_free():
    logits = torch.randn(1, 3, 6, generator=torch.Generator().manual_seed(8), requires_grad=True)
    s = torch.log_softmax(logits, -1)
    ids = s.topk(2, -1).indices
    t_lp = torch.tensor([[[-0.1, -3.0], [float("-inf"), float("nan")], [0.0, 0.0]]])  # padding holds junk
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    per = L.reverse_kl_candidates(s, ids, t_lp, mask, "none")
    assert per[0, 1:].abs().sum().item() == 0.0 and torch.isfinite(per).all()
    (g,) = torch.autograd.grad(per.sum(), logits)
    assert torch.isfinite(g).all()


def test_the_table_row_reads_the_candidates():
    s, t = rand_lp(2, 3, 7, seed=9), rand_lp(2, 3, 7, seed=10)
    ids = s.topk(3, -1).indices
    tb = L.TeacherBatch(torch.zeros(2, 3), cand_ids_BTC=ids, cand_lp_BTC=t.gather(-1, ids))
    mask = torch.ones(2, 3)
    assert L.LOSSES["reverse_kl_candidates"].need == L.Need.CANDIDATES
    got = L.compute_loss("reverse_kl_candidates", s, ids[..., 0], tb, mask)
    torch.testing.assert_close(got, L.reverse_kl_candidates(s, ids, t.gather(-1, ids), mask))


def test_requests_name_each_scored_position_s_candidates_and_results_pad_back():
    from services.teacher.types import ScoreResult
    from trainer.sampling import from_completions

    ro = from_completions([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    ro.cand_ids_BTC = torch.arange(18).view(2, 3, 3)
    reqs = build_requests(ro, need=L.Need.CANDIDATES, job_id="j", top_k=5, temperature=1.0, scored=[2, 1])
    assert reqs[0].top_k == 0 and not reqs[0].full
    np.testing.assert_array_equal(reqs[0].candidate_ids, [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(reqs[1].candidate_ids, [[9, 10, 11]])
    results = [
        ScoreResult("a", np.zeros(2, np.float32), candidate_logprobs=-np.ones((2, 3), np.float32)),
        ScoreResult("b", np.zeros(1, np.float32), candidate_logprobs=-2 * np.ones((1, 3), np.float32)),
    ]
    tb = to_teacher_batch(results, 3, "cpu", L.Need.CANDIDATES, cand_ids_BTC=ro.cand_ids_BTC)
    assert tb.cand_ids_BTC.shape == tb.cand_lp_BTC.shape == (2, 3, 3)
    np.testing.assert_array_equal(tb.cand_ids_BTC[0, :2].numpy(), ro.cand_ids_BTC[0, :2].numpy())
    assert tb.cand_lp_BTC[1, 0].tolist() == [-2.0] * 3


@pytest.mark.parametrize(
    ("source", "loss"),
    [
        ("student", "reverse_kl_candidates"),
        ("gold", "reverse_kl_candidates"),
        ("student", "reverse_kl_candidates_topk"),
    ],
)
def test_a_step_asks_the_teacher_for_the_student_s_own_top_c(
    tiny_student, tiny_teacher, tmp_path, source, loss
):
    """Rollouts of the student carry its top-C from sampling, gold rollouts get it from a student forward; the
    teacher's answers are its full rows gathered at those ids; a train step runs on them."""
    from test_trainer_variants import config, started

    from trainer.loop import train_step
    from trainer.rollouts import prepare_minibatch
    from trainer.sampling import student_logprobs

    torch.set_default_dtype(torch.float32)
    C = 5
    extra = [f"loss={loss}", f"candidates={C}", "top_k=3", "steps=1", "batch_size=2", "micro_batch_size=2"]
    cfg = config(tiny_student, tiny_teacher, tmp_path / "run", f"rollouts.source={source}", *extra)
    with started(cfg) as run:
        mb = prepare_minibatch(run, 0)
        for m in mb.micro:
            results = m.scores.result()
            with torch.no_grad():
                s_lp_BTV = student_logprobs(run.model, m.ro)
            full = run.teacher.score(
                build_requests(m.ro, need=L.Need.FULL, job_id="j", top_k=0, temperature=1.0)
            )
            for i, (res, n) in enumerate(zip(results, m.ro.lengths, strict=True)):
                ids_TC = m.ro.cand_ids_BTC[i, :n]
                assert res.candidate_logprobs.shape == (n, C)
                assert (
                    res.top_k_ids is None
                    if loss == "reverse_kl_candidates"
                    else res.top_k_ids.shape == (n, 3)
                )
                np.testing.assert_allclose(
                    res.candidate_logprobs,
                    np.take_along_axis(full[i].full_float32(), ids_TC.numpy(), 1),
                    atol=1e-5,
                )
                s_TV = s_lp_BTV[i, :n]
                outside = s_TV.scatter(1, ids_TC, float("-inf")).max(1).values
                assert (s_TV.gather(1, ids_TC).min(1).values >= outside - 1e-4).all()  # the student's top-C
        res = train_step(run, mb)
        assert math.isfinite(res.loss_sum) and res.loss_sum > 0 and res.grad_norm > 0


# ---------------------------------------------------------------------------- the union with the teacher's top-k
def union_kl_by_hand(s_lp, t_lp, cand, topk):
    """Reverse KL over {cand} | {topk} plus one tail bucket, one position, in plain Python."""
    p, q = [math.exp(x) for x in s_lp], [math.exp(x) for x in t_lp]
    ids = sorted(set(cand) | set(topk))
    sp, tq = [p[i] for i in ids], [q[i] for i in ids]
    if len(ids) < len(p):
        sp.append(1 - sum(sp))
        tq.append(1 - sum(tq))
    return sum(a * math.log(a / b) for a, b in zip(sp, tq, strict=True) if a > 0)


def test_union_with_the_teacher_top_k_against_a_closed_form():
    s, t = rand_lp(2, 3, 12, seed=21), rand_lp(2, 3, 12, seed=22)
    cand, topk = s.topk(4, -1).indices, t.topk(3, -1).indices  # overlapping at some positions
    per = L.reverse_kl_candidates_topk(
        s, cand, t.gather(-1, cand), topk, t.gather(-1, topk), torch.ones(2, 3), "none"
    )
    overlaps = 0
    for b in range(2):
        for j in range(3):
            c, k = cand[b, j].tolist(), topk[b, j].tolist()
            overlaps += len(set(c) & set(k))
            want = union_kl_by_hand(s[b, j].tolist(), t[b, j].tolist(), c, k)
            assert per[b, j].item() == pytest.approx(want, rel=1e-10)
    assert overlaps > 0  # the repeated ids were exercised
    full = L.reverse_kl_full(s, t, torch.ones(2, 3), "none")
    only_cand = L.reverse_kl_candidates(s, cand, t.gather(-1, cand), torch.ones(2, 3), "none")
    assert (per <= full + 1e-12).all() and (per >= only_cand - 1e-12).all()  # a finer bucketing: between


def test_union_covering_the_vocabulary_with_repeats_is_exact_and_nan_free():
    logits = torch.randn(1, 2, 6, generator=torch.Generator().manual_seed(23), requires_grad=True)
    s, t = torch.log_softmax(logits, -1), rand_lp(1, 2, 6, seed=24)
    cand = torch.tensor([[[0, 1, 2, 3], [5, 4, 3, 2]]])
    topk = torch.tensor([[[3, 4, 5], [1, 0, 2]]])  # U = 7 > V = 6, one id repeated at each position
    per = L.reverse_kl_candidates_topk(
        s, cand, t.gather(-1, cand), topk, t.gather(-1, topk), torch.ones(1, 2), "none"
    )
    torch.testing.assert_close(per, L.reverse_kl_full(s, t, torch.ones(1, 2), "none"))
    (g,) = torch.autograd.grad(per.sum(), logits)
    assert torch.isfinite(g).all()


def test_candidates_topk_requests_ask_for_both_and_results_pad_back_both():
    from services.teacher.types import ScoreResult
    from trainer.sampling import from_completions

    ro = from_completions([[1, 2], [3]], [[4, 5, 6], [7]], pad_id=0)
    ro.cand_ids_BTC = torch.arange(18).view(2, 3, 3)
    need = L.LOSSES["reverse_kl_candidates_topk"].need
    assert need.asks_topk and need.asks_candidates
    reqs = build_requests(ro, need=need, job_id="j", top_k=2, temperature=1.0, scored=[2, 1])
    assert reqs[0].top_k == 2 and not reqs[0].full
    np.testing.assert_array_equal(reqs[1].candidate_ids, [[9, 10, 11]])
    results = [
        ScoreResult(
            "a",
            np.zeros(2, np.float32),
            top_k_ids=np.array([[7, 8], [9, 10]], np.int32),
            top_k_logprobs=-np.ones((2, 2), np.float32),
            candidate_logprobs=-np.ones((2, 3), np.float32),
        ),
        ScoreResult(
            "b",
            np.zeros(1, np.float32),
            top_k_ids=np.array([[11, 12]], np.int32),
            top_k_logprobs=-np.ones((1, 2), np.float32),
            candidate_logprobs=-2 * np.ones((1, 3), np.float32),
        ),
    ]
    tb = to_teacher_batch(results, 3, "cpu", need, cand_ids_BTC=ro.cand_ids_BTC)
    assert tb.topk_ids_BTK.shape == (2, 3, 2) and tb.cand_lp_BTC.shape == (2, 3, 3)
    assert tb.topk_ids_BTK[1, 0].tolist() == [11, 12] and tb.cand_lp_BTC[1, 0].tolist() == [-2.0] * 3
