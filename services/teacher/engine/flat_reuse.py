"""Every request of a batch that reuses a kept prompt, in one pass with its completion tokens packed end to end.

`prompt_kv.completion_pass` runs reused requests as right-padded rows: each pass pads its rows to its longest
completion, so a batch is cut into a few passes of similar lengths (`prompt_kv.length_groups`), and each pass
pays the model's fixed cost again. On SmolLM2 in bfloat16 (2 AMX Xeon cores) 64 completions of 16..64 tokens took
925 ms in 4 passes (0.33 ms a token) where one pass of 64 x 40 tokens took 636 ms (0.25 ms).

Here the decoder sees one sequence of all N completion tokens (no padding anywhere but in attention), with each
token's true position (its prompt's length plus its index). The linear layers, norms and rotary embeddings are
per token, so packing changes nothing for them; only attention mixes tokens, and it runs per request: an
attention implementation wrapped around the model's own (`install`) receives the pass's `FlatPlan` through the
decoder's keyword arguments (transformers hands them down to attention), gathers each request's queries, keys and
values into right-padded (R, heads, T, head_dim) rows, puts its prompt's kept keys/values in front, runs the
model's own attention function with a mask (prompt columns up to the request's prompt length, then causal), and
scatters the rows back. Calls without a plan go to the model's attention unchanged.

A model whose code does not hand keyword arguments to attention never sees the plan; `flat_pass` then reports
failure (the plan counts the layers that used it) and the caller falls back to padded passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from services.teacher.types import ScoreRequest

PLAN_KWARG = "prefix_distill_flat_plan"
SUFFIX = "+flat_reuse"
# Attention calls a layer (of requests of similar lengths, each padded to its longest): see `make_plan`. 1, 2, 4
# and 8 ran alike on SmolLM2's distillation traffic; more than one bounds the padding when one request is much
# longer than the rest.
MAX_ATTENTION_CALLS = 4


@dataclass(frozen=True)
class Rows:
    """Requests of similar completion lengths whose attention runs as one right-padded (R, heads, T, d) call."""

    rows_RT: torch.Tensor
    """(R, T) int64: the packed index of each request's token t (T the longest here; padding points at 0)."""
    padded_M: torch.Tensor
    """(M,) int64: the padded (R x T) index of each real token of these rows ..."""
    packed_M: torch.Tensor
    """(M,) int64: ... and its packed index, in the same order."""
    mask_R1TK: torch.Tensor
    """(R, 1, T, Pm + T) bool, True where a query attends: its prompt's columns, then causal over its own."""
    group_R: torch.Tensor
    """(R,) int64: the distinct prompt of each request."""


@dataclass
class FlatPlan:
    """Where each request's completion tokens sit in the packed sequence, and what they attend to."""

    rows: list[Rows]
    prompts_GL2hPd: torch.Tensor
    """Keys/values of each distinct prompt (layers, 2, kv heads, Pm, head_dim), zeros past its length."""
    layers_used: set[int] = field(default_factory=set)


def _rows(t_R, P_R, starts_R, group_R, Pm: int, device) -> Rows:
    R, T = len(t_R), int(t_R.max())
    ar_T = np.arange(T)
    valid_RT = ar_T[None, :] < t_R[:, None]
    packed_RT = starts_R[:, None] + ar_T[None, :]
    prompt_cols_RP = np.arange(Pm)[None, :] < P_R[:, None]
    causal_TT = np.tril(np.ones((T, T), dtype=bool))
    mask_RTK = np.concatenate(
        [np.broadcast_to(prompt_cols_RP[:, None, :], (R, T, Pm)), np.broadcast_to(causal_TT, (R, T, T))],
        axis=2,
    )
    as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
    return Rows(
        rows_RT=as_tensor(np.where(valid_RT, packed_RT, 0)),
        padded_M=as_tensor(np.flatnonzero(valid_RT)),
        packed_M=as_tensor(packed_RT[valid_RT]),
        mask_R1TK=as_tensor(mask_RTK).unsqueeze(1),
        group_R=as_tensor(group_R),
    )


def make_plan(requests: Sequence[ScoreRequest], prompt_kv: Sequence[torch.Tensor], device) -> FlatPlan:
    """The plan of a pass over completion tokens 0..T_r - 2 of each request (T_r >= 2), whose prompt's kept
    keys/values are `prompt_kv[r]` (requests sharing a prompt share the tensor). Attention runs in at most
    `MAX_ATTENTION_CALLS` calls a layer, of requests of similar lengths (`prompt_kv.length_groups`)."""
    from services.teacher.engine.prompt_kv import length_groups

    t_R = np.array([r.completion_token_ids.size - 1 for r in requests])
    P_R = np.array([r.prompt_token_ids.size for r in requests])
    starts_R = np.concatenate([[0], np.cumsum(t_R)[:-1]])
    Pm = int(P_R.max())
    groups: dict[int, int] = {}  # one copy of each distinct prompt (requests sharing one share its tensor)
    distinct, group_R = [], []
    for kv in prompt_kv:
        if id(kv) not in groups:
            groups[id(kv)] = len(distinct)
            distinct.append(kv)
        group_R.append(groups[id(kv)])
    L, _, h, _, d = distinct[0].shape
    prompts_GL2hPd = distinct[0].new_zeros((len(distinct), L, 2, h, Pm, d))
    for g, kv in enumerate(distinct):
        prompts_GL2hPd[g, :, :, :, : kv.shape[3]] = kv
    group_R = np.array(group_R)
    rows = [
        _rows(t_R[ix], P_R[ix], starts_R[ix], group_R[ix], Pm, device)
        for ix in map(np.array, length_groups(list(range(len(requests))), list(t_R), MAX_ATTENTION_CALLS))
    ]
    return FlatPlan(rows, prompts_GL2hPd)


def _per_request(x_1hNd: torch.Tensor, rows_RT: torch.Tensor) -> torch.Tensor:
    """(1, heads, N, d) packed -> (R, heads, T, d) right-padded rows."""
    R, T = rows_RT.shape
    x_Nhd = x_1hNd[0].transpose(0, 1)
    return x_Nhd.index_select(0, rows_RT.view(-1)).view(R, T, *x_Nhd.shape[1:]).transpose(1, 2)


def attend(base, module, query_1hNd, key_1kNd, value_1kNd, plan: FlatPlan, **kwargs) -> torch.Tensor:
    """The model's attention function `base` per request, against its prompt; returns (1, N, heads, d)."""
    layer = module.layer_idx
    plan.layers_used.add(layer)
    _, h, N, d = query_1hNd.shape
    out_Nhd = query_1hNd.new_empty((N, h, d))
    prompts_G2hPd = plan.prompts_GL2hPd[:, layer]
    for rows in plan.rows:
        prompt_R2hPd = prompts_G2hPd.index_select(0, rows.group_R)
        k_RkKd = torch.cat([prompt_R2hPd[:, 0], _per_request(key_1kNd, rows.rows_RT)], dim=2)  # K = Pm + T
        v_RkKd = torch.cat([prompt_R2hPd[:, 1], _per_request(value_1kNd, rows.rows_RT)], dim=2)
        q_RhTd = _per_request(query_1hNd, rows.rows_RT)
        out_RThd, _ = base(module, q_RhTd, k_RkKd, v_RkKd, rows.mask_R1TK, **kwargs)
        R, T = rows.rows_RT.shape
        out_Nhd.index_copy_(0, rows.packed_M, out_RThd.reshape(R * T, h, d).index_select(0, rows.padded_M))
    return out_Nhd.unsqueeze(0)


def install(model) -> bool:
    """Wraps `model`'s attention implementation so that a call carrying a FlatPlan runs per request; returns
    whether the model could take it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    base_name = model.config._attn_implementation
    if base_name.endswith(SUFFIX):
        return True
    base = ALL_ATTENTION_FUNCTIONS.get(base_name)
    if base is None:
        return False

    def forward(module, query, key, value, attention_mask, **kwargs):
        plan = kwargs.pop(PLAN_KWARG, None)
        if plan is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        return attend(base, module, query, key, value, plan, **kwargs), None

    name = base_name + SUFFIX
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])
    try:
        model.set_attn_implementation(name)
    except (ValueError, NotImplementedError):
        return False
    return True


def flat_pass(decoder, device, requests: Sequence[ScoreRequest], prompt_kv: Sequence[torch.Tensor]):
    """Final hidden states (N, H) of completion tokens 0..T_r - 2 of every request, packed in request order, or
    None where the model did not hand the plan to every attention layer (nothing computed is then usable)."""
    plan = make_plan(requests, prompt_kv, device)
    ids_N = np.concatenate([r.completion_token_ids[:-1] for r in requests])
    pos_N = np.concatenate(
        [r.prompt_token_ids.size + np.arange(r.completion_token_ids.size - 1) for r in requests]
    )
    out = decoder(
        input_ids=torch.from_numpy(ids_N).to(device).unsqueeze(0),
        position_ids=torch.from_numpy(pos_N).to(device).unsqueeze(0),
        # a prepared 4-d mask is passed through as it is (the plan holds the real ones): no (N, N) mask is built
        attention_mask=torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device),
        use_cache=False,
        **{PLAN_KWARG: plan},
    )
    if len(plan.layers_used) != decoder.config.num_hidden_layers:
        return None
    return out.last_hidden_state[0]
