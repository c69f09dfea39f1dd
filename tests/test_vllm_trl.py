"""TRL 1.16.0's own client and trainer against the teacher service's vLLM dialect: code nobody here wrote.

`VLLMClient.__init__` refuses to start unless the `vllm` package imports, although nothing on the scoring path
(`check_server`, `/v1/models`, `get_sequence_logprobs`) uses it; the tests stub that one check
(`trl.generation.vllm_client.is_vllm_available`) and nothing else. Its `check_server` polls `/health` forever on a
404, so every test here has a timeout of its own.
"""

from __future__ import annotations

import math
import re

import httpx
import numpy as np
import pytest
from dialect_ref import next_row, reference_rows, top_ids
from teacher_proc import Teacher

pytest.importorskip("trl")
VOCAB = 512


@pytest.fixture(scope="module")
def teacher(tiny_teacher, redis_url, tmp_path_factory):
    with Teacher(tiny_teacher, redis_url, tmp_path_factory.mktemp("trl")) as t:
        yield t


@pytest.fixture
def vllm_client(monkeypatch):
    import trl.generation.vllm_client as vc

    monkeypatch.setattr(vc, "is_vllm_available", lambda *a, **k: True)  # the one stub: see the docstring
    return vc.VLLMClient


def served(teacher) -> float:
    """Requests the teacher answered on the vLLM dialect (its /metrics)."""
    text = httpx.get(teacher.http + "/metrics", timeout=10).text
    found = re.search(r'teacher_requests_total\{code="OK",transport="vllm"\} ([0-9.e+]+)', text)
    return float(found.group(1)) if found else 0.0


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("top", "temperature", "chunk"), [(1, 1.0, 0), (8, 1.0, 1), (8, 0.7, 2)])
def test_get_sequence_logprobs_equals_a_plain_forward(
    teacher, tiny_teacher, vllm_client, top, temperature, chunk
):
    client = vllm_client(base_url=teacher.http, connection_timeout=30)
    rng = np.random.default_rng(top + chunk)
    head = rng.integers(3, VOCAB, 20).tolist()
    sequences = [head + rng.integers(3, VOCAB, int(rng.integers(2, 12))).tolist() for _ in range(5)]
    sequences += [[42, 43, 44], [42]]  # scored from position 1, and one token (nothing to score)
    prompt_lengths = [20] * 5 + [1, 1]
    out = client.get_sequence_logprobs(
        sequences, prompt_lengths, top_logprobs=top, temperature=temperature, chunk_size=chunk
    )
    for b, (seq, p) in enumerate(zip(sequences, prompt_lengths, strict=True)):
        rows = reference_rows(tiny_teacher, seq, temperature)
        assert len(out["logprobs"][b]) == len(seq) - p
        for t, i in enumerate(range(p, len(seq))):
            assert out["logprob_token_ids"][b][t] == top_ids(rows[i], top)
            np.testing.assert_allclose(out["logprobs"][b][t], np.sort(rows[i])[::-1][:top], atol=1e-4)
            assert abs(out["actual_logprobs"][b][t][0] - rows[i][seq[i]]) < 1e-4
            assert out["actual_token_ids"][b][t] == [seq[i]]


def _run_one_step(tmp_path, student, teacher, beta: float, loss_top_k: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.server_distillation import ServerDistillationConfig, ServerDistillationTrainer

    config = ServerDistillationConfig(
        output_dir=str(tmp_path),
        teacher_model_server_url=teacher.http,
        max_completion_length=8,  # prefix OPD in TRL: a constant L
        per_device_train_batch_size=2,
        max_steps=1,
        learning_rate=1e-3,
        beta=beta,
        loss_top_k=loss_top_k,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
    )
    tokenizer = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student)
    data = Dataset.from_list([{"prompt": "P770="}, {"prompt": "the sum of 3 and 4 is"}])
    trainer = ServerDistillationTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer
    )
    trainer.train()
    return next(rec for rec in trainer.state.log_history if "grad_norm" in rec)


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("beta", "loss_top_k"), [(1.0, 1), (0.0, 4)])
def test_server_distillation_trainer_one_step(teacher, tiny_student, vllm_client, tmp_path, beta, loss_top_k):
    before = served(teacher)
    record = _run_one_step(tmp_path, tiny_student, teacher, beta, loss_top_k)
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]), record
    assert record["grad_norm"] > 0
    assert served(teacher) > before  # the teacher scored the step's completions


def test_next_row_reference_is_sane(tiny_teacher):
    """The reference itself: the next-token row is a distribution (guards the helpers the checks above use)."""
    assert abs(np.exp(next_row(tiny_teacher, [5, 6, 7])).sum() - 1) < 1e-9
