"""The worker's grouping of a batch into groups answered one after another (`reply_groups`)."""

from __future__ import annotations

import numpy as np

from services.teacher.types import ScoreRequest
from services.teacher.worker import reply_groups


def req(t: int, full: bool = False, dtype: str = "float32") -> ScoreRequest:
    return ScoreRequest(np.array([1, 2]), np.arange(t), full=full, full_dtype=dtype)


def test_light_requests_first_then_full_rows_in_bounded_groups():
    # vocab 1000: a 100-position float32 request is 400 kB of rows; groups hold at most 1 MB.
    reqs = [req(100, True), req(5), req(100, True), req(100, True), req(7), req(100, True, "float16")]
    assert reply_groups(reqs, 1000, max_bytes=1_000_000) == [[1, 4], [0, 2], [3, 5]]


def test_a_request_larger_than_the_bound_is_a_group_of_its_own():
    reqs = [req(1000, True), req(1000, True), req(3)]
    assert reply_groups(reqs, 1000, max_bytes=10) == [[2], [0], [1]]


def test_a_batch_without_full_rows_is_one_group():
    assert reply_groups([req(3), req(4)], 1000) == [[0, 1]]
    assert reply_groups([], 1000) == []
