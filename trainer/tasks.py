"""Prompt sets: built-in tasks (`builtin:NAME`) and JSONL files, split into training and held-out prompts.

`builtin:route` and `builtin:relay` are the testbed's decision tasks (services.models.decisions): answers of
~100 characters whose decisions (a tag) are computed from several digits of the prompt, taken first (route) or
once per block (relay), with compositional validation and held-out splits; any valid answer counts, and the
teacher prefers one. `builtin:plan` and `builtin:chain` are the withdrawn first testbed (services.models.rules),
kept to reproduce its negative finding: a prompt-independent answer is valid there. `builtin:arith` is a
CPU-sized reasoning task: one- and two-step arithmetic word problems with small numbers and
an exact integer answer, asking for step-by-step reasoning that ends with "Answer: N". SmolLM2-135M-Instruct
answers about one in five correctly with greedy 48-token answers (most of its answers need more tokens), its
6-layer student none: distillation has room to move the student.
The split is fixed (its own seed), so every run and every rank sees the same held-out prompts.

A JSONL file holds one object per line with `prompt` (text) and optional `answer` (the exact final answer) and
`split` ("train" or "eval"); without any `split`, every tenth line is held out.

Prompts are rendered with the student tokenizer's chat template (format "auto" when it has one, or "chat"), as
one user message with the generation prompt appended, or used as they are ("raw"); then tokenized without
adding special tokens (a chat template writes its own).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from services.models.decisions import DECISION_TASKS, DecisionTask
from services.models.rules import RULE_TASKS

ARITH_INSTRUCTION = " Think step by step, then end with 'Answer: N'."
_NAMES = ("Tom", "Sara", "Ben", "Lily", "Sam", "Mia", "Max", "Anna")
_ITEMS = ("apples", "books", "pens", "cards", "coins", "stickers", "eggs", "balls")


@dataclass(frozen=True)
class Example:
    """One prompt and, when the task has one, its exact final answer (or, for a rule task, one valid answer)."""

    prompt: str
    answer: str | None = None
    rule: str | None = None
    """The rule task (services.models.rules or .decisions) that checks answers to this prompt; None: exact
    final answer."""

    def is_correct(self, response: str) -> bool:
        """Whether `response` answers the prompt: checked by the rule task, else by its final answer."""
        if self.rule is not None:
            return _RULES[self.rule].is_correct(self.prompt, response)
        assert self.answer is not None, "a prompt without an answer cannot be checked"
        return is_correct(response, self.answer)

    @property
    def decisions(self) -> DecisionTask | None:
        """The decision task of this prompt (where its answers take decisions, which one the teacher prefers),
        or None for tasks without marked decisions."""
        task = DECISION_TASKS.get(self.rule or "")
        return task

    def forced_decisions(self) -> dict[int, str]:
        """{answer offset: tag} of the teacher's preferred decisions (a decision task's rule; else empty): what
        the execution metric forces."""
        task = self.decisions
        if task is None:
            return {}
        return dict(zip(task.points, task.teacher_tags(task.parse(self.prompt)), strict=True))


_RULES = {**RULE_TASKS, **DECISION_TASKS}
"""Every rule task by name: the testbed's decision tasks and the withdrawn `plan` / `chain`."""

SPLITS = ("heldout", "validation")
"""What a run evaluates on (eval.split): the held-out split, or the validation part of the training prompts."""
VALIDATION_PROMPTS = 150
"""Training prompts set aside (a fixed choice) as the validation split."""


@dataclass
class Task:
    name: str
    train: list[Example]
    heldout: list[Example]
    validation_split: list[Example] | None = None
    """A validation split of its own (decision tasks: compositional, like the held-out split); None: carved
    from the training prompts by `validation`."""

    def validation(self, n: int = VALIDATION_PROMPTS) -> Task:
        """This task with its validation prompts as the evaluation split and the held-out split gone: settings
        chosen on it never saw a held-out prompt. Without a split of its own, a fixed `n` of its training
        prompts, then left out of training."""
        if self.validation_split is not None:
            return Task(self.name, train=self.train, heldout=self.validation_split)
        if len(self.train) < 2 * n:
            raise ValueError(
                f"{self.name}: {len(self.train)} training prompts are too few for a validation split."
            )
        order = list(range(len(self.train)))
        random.Random(f"validation:{self.name}").shuffle(order)
        chosen = set(order[:n])
        rest = [ex for i, ex in enumerate(self.train) if i not in chosen]
        return Task(self.name, train=rest, heldout=[self.train[i] for i in order[:n]])


def _arith_problem(rng: random.Random) -> Example:
    kind = rng.randrange(6)
    name, items = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    if kind == 0:
        q, ans = f"What is {a} + {b}?", a + b
    elif kind == 1:
        a, b = max(a, b), min(a, b)
        q, ans = f"What is {a} - {b}?", a - b
    elif kind == 2:
        q, ans = (
            f"{name} has {a} {items}. {name} gets {b} more {items}. How many {items} does {name} have now?",
            a + b,
        )
    elif kind == 3:
        a, b = max(a, b), min(a, b)
        q, ans = (
            f"{name} had {a} {items} and gave {b} of them away. How many {items} does {name} have left?",
            a - b,
        )
    elif kind == 4:
        a, b = rng.randint(2, 6), rng.randint(2, 5)
        q, ans = f"A bag holds {a} {items}. How many {items} are in {b} bags?", a * b
    else:
        c = rng.randint(1, min(a + b, 9))
        q, ans = (
            f"{name} has {a} {items}, gets {b} more, then loses {c}. How many {items} does {name} have?",
            a + b - c,
        )
    return Example(q + ARITH_INSTRUCTION, str(ans))


def arith_task(n_train: int = 2000, n_heldout: int = 200) -> Task:
    """The built-in arithmetic task (deterministic; held-out questions never appear in training)."""
    rng = random.Random(20260215)
    seen: set[str] = set()
    pool: list[Example] = []
    while len(pool) < n_train + n_heldout:
        ex = _arith_problem(rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            pool.append(ex)
    return Task("builtin:arith", train=pool[n_heldout:], heldout=pool[:n_heldout])


def rule_task(name: str) -> Task:
    """A testbed task of services.models.rules: fixed splits, a shipped gold answer, checked by its rule."""
    rules = RULE_TASKS[name]
    train, heldout = rules.split()
    random.Random(rules.split_seed).shuffle(heldout)  # a fixed order in which any first N are representative

    def examples(ns: list[int]) -> list[Example]:
        return [Example(rules.prompt(n), rules.gold(n), rule=name) for n in ns]

    return Task(f"builtin:{name}", train=examples(train), heldout=examples(heldout))


def decision_task(name: str) -> Task:
    """A decision task of services.models.decisions: its fixed compositional splits, gold answers drawn
    without the teacher's preference, each prompt checked by the task's rule."""
    task = DECISION_TASKS[name]
    splits = task.split()

    def examples(key: str) -> list[Example]:
        return [Example(task.prompt(x), task.gold(x), rule=name) for x in splits[key]]

    return Task(f"builtin:{name}", examples("train"), examples("heldout"), examples("validation"))


BUILTIN = {
    "arith": arith_task,
    "route": lambda: decision_task("route"),
    "relay": lambda: decision_task("relay"),
    "plan": lambda: rule_task("plan"),
    "chain": lambda: rule_task("chain"),
}


def load_task(source: str) -> Task:
    """A task from `builtin:NAME` or a JSONL path; ValueError with a clear text otherwise."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN:
            raise ValueError(
                f"`prompts` builtin:{name} is unknown; built-in tasks: "
                f"{', '.join('builtin:' + k for k in BUILTIN)}."
            )
        return BUILTIN[name]()
    path = Path(source)
    if not path.exists():
        raise ValueError(f"`prompts` {source!r} is neither builtin:NAME nor an existing JSONL file.")
    rows = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg}).") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise ValueError(f"{path}:{lineno}: each line needs a non-empty string `prompt`.")
        answer = obj.get("answer")
        rows.append((Example(obj["prompt"], None if answer is None else str(answer)), obj.get("split")))
    if not rows:
        raise ValueError(f"{path} holds no prompts.")
    if any(split is not None for _, split in rows):
        train = [ex for ex, split in rows if split in (None, "train")]
        heldout = [ex for ex, split in rows if split in ("eval", "test", "heldout")]
    else:
        train = [ex for i, (ex, _) in enumerate(rows) if i % 10 != 9]
        heldout = [ex for i, (ex, _) in enumerate(rows) if i % 10 == 9]
    if not train:
        raise ValueError(f"{path} has no training prompts.")
    return Task(str(path), train, heldout)


def uses_chat(tokenizer, fmt: str) -> bool:
    if fmt == "raw":
        return False
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt == "chat" and not has_template:
        raise ValueError("`prompt_format` is 'chat' but the student's tokenizer has no chat template.")
    return has_template


def render(example: Example, tokenizer, fmt: str = "auto") -> list[int]:
    """Token ids of the prompt as the student sees it (chat template or raw text, no extra special tokens).

    A rule task's prompt is its own format (`P537=`): "auto" uses it as is.
    """
    if example.rule is not None and fmt == "auto":
        fmt = "raw"
    if uses_chat(tokenizer, fmt):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": example.prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = example.prompt if fmt == "raw" else f"Question: {example.prompt}\nAnswer:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


_MARKED = re.compile(r"(?:answer(?:\s+is)?|####)\s*[:=]?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
    """'1,000' -> '1000', '7.0' -> '7', '+3' -> '3'; other text is stripped of spaces and a final period."""
    t = text.strip().rstrip(".").replace(",", "").lstrip("+")
    try:
        value = float(t)
    except ValueError:
        return t
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(response: str) -> str | None:
    """The final answer of a response: the last 'Answer: N' / 'answer is N' / '#### N', else its last number."""
    marked = _MARKED.findall(response)
    if marked:
        return normalize_number(marked[-1])
    numbers = _NUMBER.findall(response)
    return normalize_number(numbers[-1]) if numbers else None


def is_correct(response: str, answer: str) -> bool:
    """Exact match of the response's final answer with the reference (numbers compared in normal form)."""
    got = extract_answer(response)
    return got is not None and got == normalize_number(answer)
