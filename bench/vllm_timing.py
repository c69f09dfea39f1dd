"""Times vLLM's `prompt_logprobs` on given token-id requests (run in `.venv-vllm` by teacher_throughput.py).

    VLLM_TARGET_DEVICE=cpu ... .venv-vllm/bin/python bench/vllm_timing.py REQUESTS.json

REQUESTS.json: {"model", "dtype", "top_k", "repeats", "requests": [[prompt ids, completion ids], ...]}. Prints
one JSON line {"median_s": ..., "times_s": [...]} (one warm-up run first, then `repeats` timed runs).
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(sys.argv[1]).read())
    longest = max(len(p) + len(c) for p, c in spec["requests"])
    llm = LLM(
        model=spec["model"],
        dtype=spec["dtype"],
        enforce_eager=True,
        max_model_len=max(256, longest + 1),  # the prompt plus the one token generate() asks for
        max_logprobs=spec["top_k"],
        enable_prefix_caching=False,
    )
    params = SamplingParams(max_tokens=1, prompt_logprobs=spec["top_k"], temperature=1.0)
    prompts = [TokensPrompt(prompt_token_ids=p + c) for p, c in spec["requests"]]
    llm.generate(prompts, params, use_tqdm=False)
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_s": statistics.median(times), "times_s": times}))


if __name__ == "__main__":
    main()
