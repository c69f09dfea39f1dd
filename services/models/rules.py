"""The first testbed's two tasks, withdrawn: a prompt-independent answer is valid on both (tag `a` on every `plan`
prompt; "never write `a`" fixes every `chain` block of the student), so a student that learns one output bias
scores 100% (docs/results/prefix_opd.md, correction). Kept to reproduce that finding; the testbed is now
services.models.decisions.

Long answers written by a rule, where the answer's first tokens do or do not decide it.

Both tasks write numbers by one skill, adding a step k to a 3-digit number modulo 1000, over ~100 characters;
they differ in *where the decisions sit*, the difference the paper's prefix method depends on:

- `plan` (task A, the decision comes first): `P537=` is answered with one tag naming the step, then 24 numbers
  (`d: 564 591 618 ...`). A tag is valid when none of the 24 numbers wraps past 999 (n + 24 k <= 999), so the
  first token plans for the whole answer; several tags are valid for most n, and the teacher prefers larger
  steps (it was trained on valid tags drawn with weights 1, 2, 4, ... by step size).
- `chain` (task B, the decision recurs): `C537=` is answered with 7 blocks of one tag and 3 numbers
  (`a: 540 543 546 |c: 565 ...`). Each block's tag must be one of two allowed for the last digit of the number the
  block starts from (a fixed table), so a decision is taken every 15 characters; the teacher prefers the first
  of the two (3 to 1).

An answer is correct when every tag is valid and every number follows from its tag: any of the valid answers
counts, so the teacher's distribution carries more than one gold answer. Everything here is pure Python: the
trainer reads the tasks (`builtin:plan`, `builtin:chain`) and `services.models.testbed` builds models for them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

STEPS = {"a": 3, "b": 11, "c": 19, "d": 27, "e": 33, "f": 39}
"""Tag -> the step added to the previous number (mod 1000)."""
PLAN_NUMBERS = 24
CHAIN_BLOCKS, CHAIN_NUMBERS = 7, 3
CHAIN_TABLE = {0: "cf", 1: "ad", 2: "be", 3: "cd", 4: "af", 5: "bd", 6: "ce", 7: "ab", 8: "df", 9: "ec"}
"""Last digit of a block's start number -> its two allowed tags, the teacher's preferred one first."""
ALPHABET = "0123456789 :=|PC" + "".join(STEPS)
"""Every character the tasks write: the testbed tokenizer's vocabulary (one token per character)."""


def walk(n: int, tag: str, count: int) -> list[int]:
    """The `count` numbers after n under `tag`: n + k, n + 2k, ... modulo 1000."""
    out, x = [], n
    for _ in range(count):
        x = (x + STEPS[tag]) % 1000
        out.append(x)
    return out


def _numbers(xs: list[int]) -> str:
    return "".join(f" {x:03d}" for x in xs)


# -- task A: plan ------------------------------------------------------------------------------------------------


def plan_valid(n: int) -> list[str]:
    """Tags whose 24 numbers stay within 999 from n, smallest step first."""
    return [t for t, k in STEPS.items() if n + PLAN_NUMBERS * k <= 999]


def plan_answer(n: int, tag: str) -> str:
    return f"{tag}:{_numbers(walk(n, tag, PLAN_NUMBERS))}"


def plan_sample(n: int, rng: random.Random, tag_weights: dict[str, float] | None = None) -> str:
    """An answer with the teacher's preference (valid tags, weights 1, 2, 4, ... by step size), or with tags
    drawn from `tag_weights` whatever n (the student's warm-up: it executes every tag, but chooses blindly)."""
    if tag_weights is None:
        valid = plan_valid(n)
        tag_weights = {t: 2.0**i for i, t in enumerate(valid)}
    tags = list(tag_weights)
    return plan_answer(n, rng.choices(tags, weights=[tag_weights[t] for t in tags])[0])


def plan_check(n: int, text: str) -> bool:
    tag = text[:1]
    return tag in plan_valid(n) and text == plan_answer(n, tag)


# -- task B: chain -----------------------------------------------------------------------------------------------


def chain_answer(n: int, tags: list[str]) -> str:
    blocks, x = [], n
    for tag in tags:
        xs = walk(x, tag, CHAIN_NUMBERS)
        blocks.append(f"{tag}:{_numbers(xs)}")
        x = xs[-1]
    return " |".join(blocks)


def chain_sample(
    n: int, rng: random.Random, table: dict[int, str] = CHAIN_TABLE, preferred: float = 0.75
) -> str:
    """An answer whose block tags follow `table` (the first of each pair with probability `preferred`)."""
    tags, x = [], n
    for _ in range(CHAIN_BLOCKS):
        pair = table[x % 10]
        tag = pair[0] if rng.random() < preferred else pair[1]
        tags.append(tag)
        x = walk(x, tag, CHAIN_NUMBERS)[-1]
    return chain_answer(n, tags)


def chain_check(n: int, text: str) -> bool:
    blocks = text.split(" |")
    if len(blocks) != CHAIN_BLOCKS:
        return False
    x = n
    for block in blocks:
        tag = block[:1]
        if tag not in CHAIN_TABLE[x % 10]:
            return False
        xs = walk(x, tag, CHAIN_NUMBERS)
        if block != f"{tag}:{_numbers(xs)}":
            return False
        x = xs[-1]
    return True


# -- the tasks as the trainer sees them --------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleTask:
    """A rule task: prompts `{marker}{n:03d}=` over a range of n, split once by a fixed seed."""

    name: str
    marker: str
    lo: int
    hi: int
    split_seed: int
    heldout_size: int
    sample: Callable[[int, random.Random], str]
    """A gold answer drawn from the teacher's preferred distribution."""
    check: Callable[[int, str], bool]
    """Whether a response (text after the prompt, special tokens dropped) is a correct answer to n."""
    points: tuple[int, ...] = (0,)
    """Answer offsets of the tags (where an answer takes a decision)."""
    options: str = "".join(STEPS)
    """The tags a decision chooses from."""

    def prompt(self, n: int) -> str:
        return f"{self.marker}{n:03d}="

    def number(self, prompt: str) -> int:
        assert prompt.startswith(self.marker) and prompt.endswith("="), prompt
        return int(prompt[len(self.marker) : -1])

    def split(self) -> tuple[list[int], list[int]]:
        """(training n, held-out n): fixed, disjoint, each sorted."""
        ns = list(range(self.lo, self.hi))
        random.Random(self.split_seed).shuffle(ns)
        return sorted(ns[self.heldout_size :]), sorted(ns[: self.heldout_size])

    def gold(self, n: int) -> str:
        """The reference answer shipped with prompt n (one draw, fixed by n)."""
        return self.sample(n, random.Random(self.split_seed * 1000 + n))

    def is_correct(self, prompt: str, response: str) -> bool:
        return self.check(self.number(prompt), response.strip("\n"))


PLAN = RuleTask("plan", "P", 100, 900, 7, 250, plan_sample, plan_check)
CHAIN = RuleTask(
    "chain",
    "C",
    0,
    1000,
    8,
    250,
    chain_sample,
    chain_check,
    points=tuple(16 * j for j in range(CHAIN_BLOCKS)),
)
RULE_TASKS = {t.name: t for t in (PLAN, CHAIN)}
