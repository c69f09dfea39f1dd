"""Starts real teacher processes (`prefix-distill teacher serve|frontend|worker`) for service tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from services.teacher.redis_server import free_port

CLI = [sys.executable, "-m", "services.cli"]


def env() -> dict:
    e = dict(os.environ)
    e.update(
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONUNBUFFERED="1",
    )
    return e


class Proc:
    """A child process with its output in a log file; killed (whole group) on stop."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.fh = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            args, stdout=self.fh, stderr=subprocess.STDOUT, env=env(), start_new_session=True
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.p.poll() is None

    def signal(self, sig: int) -> None:
        os.killpg(self.p.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.p.wait()
        self.fh.close()
        return self.p.returncode


class Teacher:
    """A teacher front-end (serve or frontend) on free ports, plus any separate worker processes."""

    def __init__(
        self,
        model: Path,
        redis_url: str,
        tmp: Path,
        *,
        mode: str = "serve",
        workers: int = 1,
        flags: dict | None = None,
    ) -> None:
        self.model, self.redis_url, self.tmp = str(model), redis_url, tmp
        self.grpc_port, self.http_port = free_port(), free_port()
        self.flags = {"visibility-timeout-s": "3", "worker-ttl-s": "2", **(flags or {})}
        args = [
            *CLI,
            "teacher",
            mode,
            "--model",
            self.model,
            "--redis-url",
            redis_url,
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--grpc-host",
            "127.0.0.1",
            "--http-host",
            "127.0.0.1",
            *self._flag_args(),
        ]
        if mode == "serve":
            args += ["--workers", str(workers)]
        self.front = Proc(args, tmp / f"{mode}-{self.grpc_port}.log")
        self.workers: list[Proc] = []

    def _flag_args(self) -> list[str]:
        out = []
        for k, v in self.flags.items():
            out += [f"--{k}", str(v)]
        return out

    @property
    def target(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def add_worker(self) -> Proc:
        args = [
            *CLI,
            "teacher",
            "worker",
            "--model",
            self.model,
            "--redis-url",
            self.redis_url,
            "--torch-threads",
            "1",
            *self._flag_args(),
        ]
        w = Proc(args, self.tmp / f"worker-{len(self.workers)}-{self.grpc_port}.log")
        self.workers.append(w)
        return w

    def wait_healthy(self, timeout: float = 90.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.front.alive():
                raise RuntimeError(f"teacher exited:\n{self.front.text()}")
            try:
                if httpx.get(self.http + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"teacher not healthy after {timeout}s:\n{self.front.text()}")

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.front.stop()

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url)
