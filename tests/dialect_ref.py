"""An independent reference for the vLLM dialect's numbers: a plain transformers forward of each whole sequence.

No project code: logits of every position, divided by the temperature, log_softmax in float64, then the actual
token's logprob, its 1-based rank (1 + ids strictly more likely) and the top-k.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


@lru_cache(maxsize=4)
def _model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def reference_rows(path, ids: list[int], temperature: float = 1.0) -> np.ndarray:
    """(n, V) float64 logprobs: row i scores token i given ids[:i] (row 0 is NaN: nothing predicts it)."""
    logits_SV = _model(str(path))(torch.tensor([ids])).logits[0].double()  # (S, V)
    lp_SV = torch.log_softmax(logits_SV / temperature, dim=-1).numpy()
    rows = np.full_like(lp_SV, np.nan)
    rows[1:] = lp_SV[:-1]
    return rows  # (n, V), plus the next-token row is lp_SV[-1]


@torch.inference_mode()
def next_row(path, ids: list[int], temperature: float = 1.0) -> np.ndarray:
    """(V,) float64 logprobs of the token after ids."""
    logits_V = _model(str(path))(torch.tensor([ids])).logits[0, -1].double()
    return torch.log_softmax(logits_V / temperature, dim=-1).numpy()


def rank_of(row: np.ndarray, token: int) -> int:
    return int((row > row[token]).sum()) + 1


def top_ids(row: np.ndarray, k: int) -> list[int]:
    return np.argsort(-row, kind="stable")[:k].tolist()


def check_entry(entry: dict, row: np.ndarray, actual: int, k: int, atol: float = 1e-4) -> None:
    """One `prompt_logprobs` entry against a reference row: actual first with its rank, then the top-k."""
    keys = list(entry)
    assert keys[0] == str(actual), (keys, actual)
    expected_top = top_ids(row, k)
    assert keys[1:] == [str(i) for i in expected_top if i != actual], (keys, expected_top)
    assert len(entry) == (k if actual in expected_top else k + 1)
    for key, v in entry.items():
        i = int(key)
        assert isinstance(v["rank"], int)
        assert abs(v["logprob"] - row[i]) <= atol, (i, v["logprob"], row[i])
        if i == actual:
            assert v["rank"] == rank_of(row, i)
        else:
            assert v["rank"] == expected_top.index(i) + 1
