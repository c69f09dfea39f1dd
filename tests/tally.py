"""Counts of the cases the hostile-input suites tried, printed at the end of the pytest run (conftest.py).

A suite adds to `TALLY[name]` as it goes; `summary()` is the line the terminal report shows.
"""

from __future__ import annotations

import collections

TALLY: collections.Counter[str] = collections.Counter()


def summary() -> str:
    parts = ", ".join(f"{name} {n}" for name, n in sorted(TALLY.items()))
    return f"bad-input suite: {sum(TALLY.values())} cases tried ({parts})"
