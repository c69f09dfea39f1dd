"""Quiet command-line output: no progress bars from the libraries the CLI loads models with."""

from __future__ import annotations


def quiet_progress_bars() -> None:
    """Turns off transformers' / huggingface_hub's tqdm bars ("Loading weights", "Writing model shards"):
    a CLI's stderr is for errors, and bars from every load would bury the one-line error messages."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
