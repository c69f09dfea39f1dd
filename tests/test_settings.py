"""Teacher settings: flag > TEACHER_* environment > default, range checks naming the field, key namespaces."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from services.teacher.settings import TeacherSettings


def test_env_then_flag_precedence(monkeypatch):
    monkeypatch.setenv("TEACHER_MAX_BATCH_TOKENS", "1234")
    monkeypatch.setenv("TEACHER_REDIS_URL", "redis://example:6379/3")
    s = TeacherSettings(model="m")
    assert s.max_batch_tokens == 1234 and s.redis_url == "redis://example:6379/3"
    assert TeacherSettings(model="m", max_batch_tokens=99).max_batch_tokens == 99
    monkeypatch.setenv("TEACHER_MODEL", "from-env")
    assert TeacherSettings().model == "from-env"


@pytest.mark.parametrize(
    "field,value",
    [("grpc_port", 70000), ("workers", -1), ("max_tries", 0), ("dtype", "int8"), ("visibility_timeout_s", 0)],
)
def test_out_of_range_names_the_field(field, value):
    with pytest.raises(ValidationError) as ei:
        TeacherSettings(model="m", **{field: value})
    assert ei.value.errors()[0]["loc"] == (field,)


def test_namespace_per_model():
    a, b = TeacherSettings(model="/models/a"), TeacherSettings(model="/models/b")
    assert a.key_namespace() != b.key_namespace() and a.key_namespace().startswith("pd:a-")
    assert TeacherSettings(model="/x", namespace="shared").key_namespace() == "pd:shared:"


def test_cli_rejects_bad_flag_with_field_named():
    r = subprocess.run(
        [sys.executable, "-m", "services.app", "teacher", "serve", "--model", "m", "--grpc-port", "99999"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "grpc_port" in r.stderr and "--grpc-port" in r.stderr


def _serve(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "services.app", "teacher", "serve", "--model", "m", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_a_redis_url_with_a_bad_port_is_a_clear_error_not_a_traceback():
    r = _serve("--redis-url", "redis://:hunter2-secret@127.0.0.1:notaport/0")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "redis_url" in r.stderr and "notaport" in r.stderr
    assert "hunter2-secret" not in r.stderr + r.stdout


def test_a_certificate_without_a_key_names_both_flags():
    r = _serve("--tls-cert-file", "/tmp/cert.pem")
    assert r.returncode == 2, r.stderr
    assert "error: :" not in r.stderr and "(flag -- or" not in r.stderr
    assert "--tls-key-file" in r.stderr and "--tls-cert-file" in r.stderr
