"""The documentation stays true: docs/config.md is what `prefix-distill config-reference` generates from the code,
every `prefix-distill ...` command the README shows exists, and the README keeps its required parts.
"""

from __future__ import annotations

import re
import subprocess

from compose_native import BIN, ROOT

README = ROOT / "README.md"


def test_config_reference_is_up_to_date():
    from services.app.config_reference import render

    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == render(), (
        "docs/config.md is stale: run prefix-distill config-reference --out docs/config.md"
    )


def test_config_reference_covers_every_key():
    from services.app.config_reference import render
    from services.teacher.settings import TeacherSettings
    from trainer.config import describe

    text = render()
    for key, _, _ in describe():
        assert f"| `{key}` |" in text, key
    for name in TeacherSettings.model_fields:
        assert f"`TEACHER_{name.upper()}`" in text, name
    for key in ("student", "teacher", "prefix.schedule", "prefix.length", "eval.every", "output_dir"):
        assert f"| `{key}` |" in text


def test_config_reference_check_command():
    result = subprocess.run(
        [str(BIN / "prefix-distill"), "config-reference", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _commands() -> dict[str, set[str]]:
    """Top-level commands of `prefix-distill` and the subcommands of its groups."""
    import click
    import typer

    from services.app.cli import app

    root = typer.main.get_command(app)
    out = {}
    for name, cmd in root.commands.items():
        out[name] = set(cmd.commands) if isinstance(cmd, click.Group) else set()
    return out


def test_readme_commands_exist():
    commands = _commands()
    text = README.read_text()
    used = re.findall(r"prefix-distill ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", text)
    assert used
    for cmd, sub in used:
        assert cmd in commands, f"README uses `prefix-distill {cmd}`, which does not exist"
        if commands[cmd]:
            assert sub in commands[cmd], f"README uses `prefix-distill {cmd} {sub}`, which does not exist"
    for target in re.findall(r"make ([a-z-]+)", text):
        assert re.search(rf"^{re.escape(target)}:", (ROOT / "Makefile").read_text(), re.M), f"make {target}"


def test_readme_has_the_required_parts():
    text = README.read_text()
    for needle in (
        "make demo",
        "make test",
        "docker compose up",
        "--scale teacher-worker=",
        "--profile two-jobs",
        "curl -s localhost:8000/v1/logprobs",
        "```mermaid",
        "docs/config.md",
        "Bring your own teacher and student",
    ):
        assert needle in text, needle
