"""vLLM's scoring dialect: a second front door onto the same engine and queue, for trainers that already speak it.

TRL's `VLLMClient.get_sequence_logprobs` (and the trainers built on it), axolotl's online KD and verl's teacher ask
a teacher for logprobs as stock `vllm serve` answers them: `GET /health`, `GET /v1/models` (OpenAI's list) and
`POST /v1/completions` with token-id prompts, `max_tokens: 1` and `prompt_logprobs: k`. This package answers the
same requests with the same JSON:

- `request.py`  the body (vLLM's fields, unknown keys ignored), its checks and what each prompt asks for;
- `prefixes.py` shared token prefixes found without a boundary (block hashes), scored once per prefix;
- `scoring.py`  one call's ScoreRequests (a shared prefix, each continuation, one-token generations);
- `render.py`   the response: `prompt_logprobs`, the echo form's `logprobs`, choices and usage;
- `routes.py`   the FastAPI routes, the OpenAI error envelope and the job a stock client's call runs under.
"""
