"""Launching `prefix-distill teacher serve | frontend | worker` as child processes.

One place for what the demo, the benchmarks and the tests all need: the command line, free local ports, a
process group per child (so `serve`'s workers go down with it), a log file, waiting for /healthz, and a stop
that sends SIGTERM to the group (the front-end drains, workers finish their batch) and SIGKILL if it lingers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from services.util.net import free_port

CLI = [sys.executable, "-m", "services.teacher"]


def child_env(**extra: str) -> dict:
    """The environment of a child teacher: offline hub, quiet progress bars, unbuffered output."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def flag_args(flags: dict) -> list[str]:
    """`{"max-batch-size": 8}` -> `["--max-batch-size", "8"]`."""
    out: list[str] = []
    for key, value in flags.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


class ChildProcess:
    """A command in its own process group with its output in `log`; `stop()` takes the whole group down."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.args, self.log, self.env = args, Path(log), env or child_env()
        self._spawn()

    def _spawn(self) -> None:
        """Starts `self.args` with its output in `self.log` (truncated)."""
        self._fh = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            self.args, stdout=self._fh, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def alive(self) -> bool:
        return self.p.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def signal(self, sig: int) -> None:
        """Sends `sig` to the whole process group."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)

    def group_alive(self) -> bool:
        try:
            os.killpg(self.p.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM to the group, SIGKILL after `timeout_s`; returns the child's exit code."""
        self.signal(signal.SIGTERM)
        end = time.monotonic() + timeout_s
        while self.alive() or self.group_alive():
            if time.monotonic() > end:
                self.signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(5)
        self._fh.close()
        return self.p.returncode


class TeacherProcess(ChildProcess):
    """A teacher front-end (`serve` with its workers, or `frontend` alone) on free ports of 127.0.0.1."""

    def __init__(
        self,
        model: str | Path,
        redis_url: str,
        log: Path,
        *,
        mode: str = "serve",
        workers: int = 1,
        flags: dict | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        assert mode in ("serve", "frontend"), mode
        self.model, self.redis_url, self.flags = str(model), redis_url, dict(flags or {})
        self.mode, self.workers = mode, workers
        self._pick_ports = grpc_port is None and http_port is None
        """Ports picked here may be taken by another process before the child binds them: then it restarts
        on new ones (wait_healthy)."""
        self.grpc_port, self.http_port = grpc_port or free_port(), http_port or free_port()
        super().__init__(self._args(), log)

    def _args(self) -> list[str]:
        args = [
            *CLI,
            self.mode,
            "--model",
            self.model,
            "--redis-url",
            self.redis_url,
            "--grpc-host",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--http-host",
            "127.0.0.1",
            "--http-port",
            str(self.http_port),
            *flag_args(self.flags),
        ]
        if self.mode == "serve":
            args += ["--workers", str(self.workers)]
        return args

    def _restart_on_new_ports(self) -> None:
        self.stop()
        self.grpc_port, self.http_port = free_port(), free_port()
        self.args = self._args()
        self._spawn()

    @property
    def tls(self) -> bool:
        return bool(self.flags.get("tls_cert_file") or self.flags.get("tls-cert-file"))

    @property
    def target(self) -> str:
        return f"grpc{'s' if self.tls else ''}://127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http{'s' if self.tls else ''}://127.0.0.1:{self.http_port}"

    def worker_args(self, flags: dict | None = None) -> list[str]:
        """The command line of a separate worker for this front-end's model and Redis."""
        return [
            *CLI,
            "worker",
            "--model",
            self.model,
            "--redis-url",
            self.redis_url,
            *flag_args({**self.flags, **(flags or {})}),
        ]

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        """Until /healthz answers 200: front-end up, Redis reachable, a worker alive with its model loaded
        (over TLS the certificate is not checked: this only waits for the process)."""
        import httpx

        end, restarts = time.monotonic() + timeout_s, 0
        while time.monotonic() < end:
            if not self.alive() and self._pick_ports and restarts < 3 and _bind_failed(self.text()):
                self._restart_on_new_ports()
                restarts += 1
                continue
            if not self.alive():
                raise RuntimeError(f"the teacher exited with {self.p.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.http + "/healthz", timeout=2, verify=False).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"the teacher was not healthy after {timeout_s:.0f} s:\n{self.tail()}")


def _bind_failed(log: str) -> bool:
    """Whether a teacher's log says one of its ports was taken (gRPC's or uvicorn's wording)."""
    return "Failed to bind to address" in log or "address already in use" in log.lower()
