"""Shared fixtures: tiny real models (built once per session) and a real Redis database per test module.

Nothing here is a fake: models are real transformers models with a locally trained tokenizer, Redis is the
real server at 127.0.0.1:6379 (or $TEST_REDIS_URL), each module getting its own database number, flushed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_teacher(models_dir) -> Path:
    """A 2-layer random Llama (hidden 64) with peaky logits: the teacher of the tests."""
    from services.models.tiny import build_tiny

    return build_tiny(models_dir / "teacher", layers=2, hidden=64, seed=1, init_std=0.2)


@pytest.fixture(scope="session")
def tiny_student(models_dir) -> Path:
    """A different random Llama sharing the teacher's tokenizer: the student of the tests."""
    from services.models.tiny import build_tiny

    return build_tiny(models_dir / "student", layers=2, hidden=64, seed=2, init_std=0.02)


@pytest.fixture(scope="session")
def tiny_other_tokenizer(models_dir) -> Path:
    """A tiny model whose tokenizer differs (smaller vocabulary): fingerprints must differ."""
    from services.models.tiny import build_tiny

    return build_tiny(models_dir / "other", layers=1, hidden=32, seed=3, vocab_size=400)


_FREE_DBS = list(range(15, 0, -1))
"""Redis database numbers not held by a module (Redis has 16 by default; 0 is left to people). A module's
number comes back when its fixture is torn down, after the processes that used it (they depend on it), so the
suite may hold more modules than numbers."""


@pytest.fixture(scope="module")
def redis_url() -> str:
    """A flushed database of the real Redis server for this test module."""
    import redis

    base = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379")
    if not _FREE_DBS:
        pytest.skip("out of Redis database numbers")
    db = _FREE_DBS.pop()
    url = f"{base}/{db}"
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        _FREE_DBS.append(db)
        pytest.skip(f"no Redis at {base}")
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()
        _FREE_DBS.append(db)


@pytest.fixture
def own_redis(tmp_path):
    """A private redis-server on a free port (for tests that stop and restart Redis or measure its memory)."""
    from services.teacher.redis_server import RedisProcess

    try:
        server = RedisProcess(workdir=str(tmp_path))
    except FileNotFoundError:
        pytest.skip("no redis-server available")
    server.start()
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter) -> None:
    """How many cases the bad-input suite tried (tests/tally.py), when it ran."""
    from tally import TALLY, summary

    if TALLY:
        terminalreporter.write_sep("-", "hostile input")
        terminalreporter.write_line(summary())
