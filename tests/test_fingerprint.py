"""The tokenizer fingerprint: stable across reloads, shared by models with one tokenizer, distinct otherwise."""

from __future__ import annotations

from transformers import AutoTokenizer

from services.teacher.modelinfo import describe, tokenizer_fingerprint
from services.teacher.settings import in_process_spec


def test_equal_across_reloads(tiny_teacher):
    a = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_teacher))
    b = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_teacher))
    assert a == b
    assert len(a) == 64 and int(a, 16) >= 0  # a sha256 hex digest


def test_teacher_and_student_share_it(tiny_teacher, tiny_student):
    """Two models built with different seeds share the tokenizer, and the ModelInfo both advertise agrees."""
    t_info, _ = describe(in_process_spec(str(tiny_teacher)))
    s_info, _ = describe(in_process_spec(str(tiny_student)))
    assert t_info.tokenizer_fingerprint == s_info.tokenizer_fingerprint
    assert t_info.tokenizer_fingerprint == tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_student))


def test_differs_for_another_tokenizer(tiny_teacher, tiny_other_tokenizer):
    a = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_teacher))
    b = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_other_tokenizer))
    assert a != b


def test_sensitive_to_added_and_special_tokens(tiny_teacher):
    """Same base vocabulary, one added token or a different special token: a different fingerprint."""
    base = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_teacher))
    added = AutoTokenizer.from_pretrained(tiny_teacher)
    added.add_tokens(["<think>"])
    assert tokenizer_fingerprint(added) != base
    special = AutoTokenizer.from_pretrained(tiny_teacher)
    special.pad_token = special.eos_token  # same vocabulary, different special-token roles
    assert tokenizer_fingerprint(special) != base
