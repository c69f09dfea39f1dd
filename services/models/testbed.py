"""The testbed pairs: a teacher that solves a rule task and a weaker student, small enough to train on 2 cores.

`prepare_pair` returns every shipped pair (`pair_names()`): the decision tasks' `route` and `relay`, the
testbed now (built by services.models.decision_pairs), and the withdrawn rule tasks' `plan` and `chain` built
here (services.models.rules says why they were withdrawn), kept to reproduce that finding.

`prefix-distill models prepare plan` (or `chain`) returns a teacher and a student folder for the task of the
same name (services.models.rules). The repository ships both pairs as built (`services/models/pairs/NAME`,
a few MB of safetensors, with the figures of their build in build.json); `--rebuild` trains them again from
their seeds, deterministically on a given machine (about 15 minutes a pair on 2 cores).

How a pair is built (recipes in PAIRS):
- one character tokenizer for both, so teacher and student share a tokenizer fingerprint;
- the teacher: a 4-layer Llama trained from scratch on answers drawn from the task's preferred distribution,
  with the loss on answer tokens only; for `plan` also on answers that carry out a blindly drawn tag (no loss
  on the tag), so that it continues any plan coherently, as a language model continues any text, and its KL to
  a student is about the choice, not about arithmetic it never saw;
- the student: a 2-layer Llama warmed up briefly, as the paper's weak students are, on data that teaches it to
  carry out every rule but not when to use which: for `plan`, tags drawn blindly (its favourite tag is often
  invalid); for `chain`, a table whose preferred tag is wrong for two of the ten digits. It starts well below the teacher
  and can learn what it lacks.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from services.models.rules import (
    ALPHABET,
    CHAIN_TABLE,
    RULE_TASKS,
    STEPS,
    RuleTask,
    chain_sample,
    plan_answer,
    plan_sample,
)

SPECIAL = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
SHIPPED = Path(__file__).resolve().parent / "pairs"
MAX_ANSWER_TOKENS = 128
"""Longer than any answer of the rule tasks (98 and 110 characters, plus EOS)."""


def build_tokenizer(alphabet: str = ALPHABET):
    """One token per character of `alphabet`, plus pad, EOS and unk: a `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL.values(), *alphabet])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=256, **SPECIAL)


@dataclass(frozen=True)
class Recipe:
    """How one model of a pair is made: its shape and its supervised training."""

    layers: int
    hidden: int
    heads: int
    steps: int
    seed: int
    lr: float = 2e-3
    batch_size: int = 64
    warmup_steps: int = 100


@dataclass(frozen=True)
class Pair:
    task: str
    teacher: Recipe
    student: Recipe
    teacher_data: Callable[[int, random.Random], str | tuple[str, int]]
    """The teacher's training answers: text, or (text, characters at its start that carry no loss)."""
    student_data: Callable[[int, random.Random], str]
    """The student's warm-up answers (what it learns to do before distillation)."""


def _plan_teacher(n: int, rng: random.Random) -> str | tuple[str, int]:
    # 3 in 10 answers carry out a tag drawn blindly, with no loss on the tag: the teacher learns to continue any
    # plan (as a language model continues any text), while only valid plans teach it which tag to choose.
    if rng.random() < 0.3:
        return plan_answer(n, rng.choice(list(STEPS))), 1
    return plan_sample(n, rng)


def _plan_warmup(n: int, rng: random.Random) -> str:
    # tags drawn whatever n: the student learns every rule, and prefers `d`, valid only for n <= 351
    return plan_sample(n, rng, {"a": 0.05, "b": 0.1, "c": 0.15, "d": 0.3, "e": 0.25, "f": 0.15})


_WRONG_TABLE = {**CHAIN_TABLE, 3: "ac", 5: "ab"}
"""The student's table: after a 3 or a 5 it prefers `a`, which is not allowed there (the others are right)."""


def _chain_warmup(n: int, rng: random.Random) -> str:
    return chain_sample(n, rng, _WRONG_TABLE)


PAIRS = {
    "plan": Pair(
        "plan", Recipe(4, 128, 4, 1500, seed=1), Recipe(2, 96, 4, 1000, seed=2), _plan_teacher, _plan_warmup
    ),
    "chain": Pair(
        "chain", Recipe(4, 128, 4, 1500, seed=1), Recipe(2, 96, 4, 1000, seed=2), chain_sample, _chain_warmup
    ),
}


def pair_names() -> list[str]:
    """Every pair `prepare_pair` accepts: the testbed's decision tasks (services.models.decision_pairs) first,
    then the withdrawn rule tasks of PAIRS (kept to reproduce their finding)."""
    from services.models.decisions import DECISION_TASKS

    return [*DECISION_TASKS, *PAIRS]


@dataclass
class PairPaths:
    teacher: Path
    student: Path


def new_model(recipe: Recipe, tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden,
        intermediate_size=recipe.hidden * 3,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    return model


def _batch(rows: list[tuple[list[int], list[int], int]], pad: int):
    """(input ids (B, S), labels (B, S)) of (prompt, answer, untrained) rows: right-padded; labels are -100 on
    the prompt, on the first `untrained` answer tokens and on the padding."""
    import torch

    S = max(len(p) + len(a) for p, a, _ in rows)
    ids_BS = torch.full((len(rows), S), pad)
    labels_BS = torch.full((len(rows), S), -100)
    for i, (p, a, untrained) in enumerate(rows):
        ids_BS[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels_BS[i, len(p) + untrained : len(p) + len(a)] = torch.tensor(a[untrained:])
    return ids_BS, labels_BS


def _answer(answers, n: int, rng: random.Random) -> tuple[str, int]:
    """(answer text, how many of its first characters carry no loss): answer functions may return either."""
    out = answers(n, rng)
    return (out, 0) if isinstance(out, str) else out


def supervised_train(model, tokenizer, task: RuleTask, answers, recipe: Recipe, progress=None) -> None:
    """AdamW (betas 0.9/0.98, wd 0.01), warm-up then cosine, clip 1.0; loss on answer tokens (EOS included)."""
    import torch
    import torch.nn.functional as F

    train_ns, _ = task.split()
    rng = random.Random(recipe.seed)
    enc = tokenizer.convert_tokens_to_ids
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    for step in range(recipe.steps):
        warm = min(1.0, (step + 1) / recipe.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        ns = [rng.choice(train_ns) for _ in range(recipe.batch_size)]
        rows = []
        for n in ns:
            text, untrained = _answer(answers, n, rng)
            rows.append((enc(list(task.prompt(n))), enc(list(text)) + [tokenizer.eos_token_id], untrained))
        ids_BS, labels_BS = _batch(rows, tokenizer.pad_token_id)
        logits_BSV = model(input_ids=ids_BS).logits
        loss = F.cross_entropy(logits_BSV[:, :-1].flatten(0, 1), labels_BS[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    model.eval()


def heldout_accuracy(model, tokenizer, task: RuleTask, batch_size: int = 125) -> float:
    """Greedy answers to every held-out prompt, checked by the task."""
    import torch

    _, heldout = task.split()
    correct = 0
    for s in range(0, len(heldout), batch_size):
        ns = heldout[s : s + batch_size]
        ids = torch.tensor([tokenizer.convert_tokens_to_ids(list(task.prompt(n))) for n in ns])
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False)
        for n, row in zip(ns, out[:, ids.shape[1] :], strict=True):
            correct += task.check(n, tokenizer.decode(row, skip_special_tokens=True))
    return correct / len(heldout)


def _build_model(name: str, role: str, recipe: Recipe, answers, tokenizer, out: Path) -> dict:
    """Trains one model of the pair `name` into `out`; returns its build record."""
    from rich.progress import Progress

    task = RULE_TASKS[name]
    t0 = time.perf_counter()
    model = new_model(recipe, tokenizer)
    with Progress(transient=True) as bar:
        job = bar.add_task(f"{name} {role}", total=recipe.steps)

        def advance(step: int, loss: float) -> None:
            bar.update(job, completed=step, description=f"{name} {role} loss {loss:.3f}")

        supervised_train(model, tokenizer, task, answers, recipe, advance)
    accuracy = heldout_accuracy(model, tokenizer, task)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_accuracy": accuracy,
        "build_s": round(time.perf_counter() - t0, 1),
    }


def build_pair(name: str, out: Path, say=print) -> PairPaths:
    """Trains the pair `name` from its seeds into `out/teacher` and `out/student`; writes out/build.json."""
    import torch

    pair = PAIRS[name]
    tokenizer = build_tokenizer()
    report: dict = {"task": f"builtin:{name}", "torch_threads": torch.get_num_threads()}
    for role, recipe, answers in (
        ("teacher", pair.teacher, pair.teacher_data),
        ("student", pair.student, pair.student_data),
    ):
        report[role] = _build_model(name, role, recipe, answers, tokenizer, out / role)
        say(
            f"{name} {role}: held-out accuracy {report[role]['heldout_accuracy']:.3f} ({report[role]['build_s']:.0f} s)"
        )
    (out / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    return PairPaths(out / "teacher", out / "student")


def prepare_pair(name: str, out: Path | None = None, rebuild: bool = False, say=print) -> PairPaths:
    """The pair `name` (a decision task, or a withdrawn rule task): the shipped copy (copied to `out` when
    given), or built from its seeds with `rebuild`."""
    from services.models.decisions import DECISION_TASKS

    if name not in pair_names():
        raise ValueError(f"`name` must be one of {pair_names()}, got {name!r}.")
    if rebuild:
        from services.models.smollm2 import default_cache

        target = out or default_cache() / "testbed" / name
        if name in DECISION_TASKS:
            from services.models.decision_pairs import build_pair as build_decision_pair

            return PairPaths(*build_decision_pair(name, target, say))
        return build_pair(name, target, say)
    shipped = SHIPPED / name
    if not (shipped / "teacher" / "config.json").exists():
        raise FileNotFoundError(f"no shipped {name} pair under {shipped}; build it with --rebuild.")
    if out is None:
        return PairPaths(shipped / "teacher", shipped / "student")
    shutil.copytree(shipped, out, dirs_exist_ok=True)
    return PairPaths(out / "teacher", out / "student")
