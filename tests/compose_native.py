"""Runs the services of docker-compose.yml natively, as Docker would run them, for tests on machines without a
Docker engine.

What a container would see is reproduced from the files themselves:
- the command: the service's `command` after compose's variable interpolation (`${VAR:-default}`, `$$`),
  behind the service's `entrypoint` or else the image's ENTRYPOINT read from its Dockerfile (`prefix-distill`
  -> this venv's console script, also first on PATH for a shell entrypoint);
- the environment: the Dockerfile's ENV, then the service's `environment`;
- volumes: every container path of the service's `volumes` (`/models`, `/runs`, `/configs`) is rewritten to a
  host folder (a named volume is a folder under `volumes_root`, a bind mount its source);
- the network: `//<service>:` in URLs becomes `//127.0.0.1:` (compose's DNS names for its services);
- healthchecks: the service's `healthcheck.test`, else the Dockerfile's HEALTHCHECK, run the same way.
Nothing else is changed: what differs between the test and a server is what the variables say.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}."""

    def sub(m: re.Match) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        value = env.get(name)
        if op in (":-", "-"):
            unset = value is None or (op == ":-" and value == "")
            return arg if unset else value
        if op in (":?", "?"):
            if value is None or (op == ":?" and value == ""):
                raise ValueError(f"required variable {name} is missing: {arg}")
            return value
        return value or ""

    return _VAR.sub(sub, text)


def _walk(node, fn):
    if isinstance(node, dict):
        return {k: _walk(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(v, fn) for v in node]
    return fn(node) if isinstance(node, str) else node


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file (`--env-file`, `.env`); comments and blank lines skipped."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            out[key.strip()] = value.strip()
    return out


def load_compose(path: Path, env: dict[str, str]) -> dict:
    """The compose file with anchors resolved and variables interpolated."""
    data = yaml.safe_load(path.read_text())
    return _walk(data, lambda s: interpolate(s, env))


# -- Dockerfiles ---------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def dockerfile_args(path: Path) -> dict[str, str | None]:
    """The ARGs of a Dockerfile (before and after FROM) with their defaults (None: declared without one)."""
    out: dict[str, str | None] = {}
    for word, args in dockerfile_instructions(path):
        if word == "ARG":
            name, sep, default = args.partition("=")
            out[name] = default if sep else None
    return out


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT / CMD / HEALTHCHECK CMD."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), args
    return value


@dataclass
class Image:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    healthcheck: list[str] | None


def read_image(dockerfile: Path) -> Image:
    entrypoint, cmd, env, health = [], [], {}, None
    for word, args in dockerfile_instructions(dockerfile):
        if word == "ENTRYPOINT":
            entrypoint = exec_form(args)
        elif word == "CMD":
            cmd = exec_form(args)
        elif word == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
        elif word == "HEALTHCHECK":
            _, _, test = args.partition("CMD ")
            health = exec_form(test.strip())
    return Image(entrypoint, cmd, env, health)


# -- services ------------------------------------------------------------------------------------------------


def native_argv(argv: list[str]) -> list[str]:
    """A container's argv on this machine: the console script and `python` of this venv."""
    head = argv[0]
    if head == "prefix-distill":
        return [str(BIN / "prefix-distill"), *argv[1:]]
    if head == "python":
        return [sys.executable, *argv[1:]]
    return argv


@dataclass
class NativeService:
    name: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str] | None
    depends_on: dict[str, str]
    proc: subprocess.Popen | None = None
    log: Path | None = None
    _fh: object = field(default=None, repr=False)

    def start(self, log_dir: Path) -> None:
        self.log = log_dir / f"{self.name}.log"
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def healthy(self) -> subprocess.CompletedProcess:
        assert self.healthcheck, f"{self.name} has no healthcheck"
        return subprocess.run(self.healthcheck, env=self.env, capture_output=True, text=True, timeout=30)

    def wait_healthy(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
            last = self.healthy()
            if last.returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(
            f"{self.name} not healthy after {timeout_s}s ({last and last.stderr}):\n{self.text()}"
        )

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{self.name} still running after {timeout_s}s:\n{self.text()[-3000:]}"
            ) from None

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (what `docker compose down` sends), SIGKILL after the timeout."""
        import signal

        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._fh:
            self._fh.close()
        return self.proc.returncode


def plan_services(
    compose_path: Path,
    variables: dict[str, str],
    volumes_root: Path,
    base_env: dict[str, str],
    volume_dirs: dict[str, Path] | None = None,
) -> dict[str, NativeService]:
    """Every service that builds one of our images, as it would run (see the module docstring).

    Named volumes are folders under `volumes_root`, unless `volume_dirs` names another folder for one.
    """
    volume_dirs = volume_dirs or {}
    compose = load_compose(compose_path, variables)
    out: dict[str, NativeService] = {}
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if not build:
            continue  # third-party images (redis): the test brings its own
        image = read_image(compose_path.parent / build["dockerfile"])
        mounts: list[tuple[str, str]] = []
        for spec in svc.get("volumes", []):
            source, target = spec.split(":")[:2]
            if source.startswith((".", "/")):
                host = compose_path.parent / source
            else:
                host = Path(volume_dirs.get(source, volumes_root / source))
            host.mkdir(parents=True, exist_ok=True)
            mounts.append((target, str(host.resolve())))
        mounts.sort(key=lambda m: -len(m[0]))
        services = set(compose["services"])

        def translate(s: str, mounts=mounts, services=services) -> str:
            for target, host in mounts:
                s = re.sub(rf"(^|=){re.escape(target)}(?=/|$)", lambda m, h=host: m.group(1) + h, s)
            for other in services:
                s = s.replace(f"//{other}:", "//127.0.0.1:")
            return s

        command = svc.get("command", image.cmd)
        command = shlex.split(command) if isinstance(command, str) else list(command)
        entrypoint = svc.get("entrypoint", image.entrypoint)
        entrypoint = shlex.split(entrypoint) if isinstance(entrypoint, str) else list(entrypoint)
        env = dict(base_env)
        env["PATH"] = f"{BIN}{os.pathsep}{base_env.get('PATH', os.defpath)}"  # `prefix-distill` in a shell
        env.update({k: translate(v) for k, v in image.env.items()})
        env.update({k: translate(str(v)) for k, v in (svc.get("environment") or {}).items()})
        test = (svc.get("healthcheck") or {}).get("test")
        if (svc.get("healthcheck") or {}).get("disable"):
            health = None
        elif test:
            assert test[0] == "CMD", f"{name}: healthcheck must be exec form"
            health = native_argv([translate(a) for a in test[1:]])
        else:
            health = native_argv([translate(a) for a in image.healthcheck]) if image.healthcheck else None
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: "service_started" for d in deps}
        else:
            deps = {d: spec.get("condition", "service_started") for d, spec in deps.items()}
        argv = native_argv([*entrypoint, *[translate(a) for a in command]])
        out[name] = NativeService(name, argv, env, health, deps)
    return out
