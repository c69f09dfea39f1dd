"""Teacher/student pairs for the decision tasks (`route`, `relay`), built from seeds and shipped small.

`prefix-distill models prepare route` (or `relay`) returns the shipped folders; `--rebuild` trains them again.

- **One tokenizer** for both models: one token per character of `decisions.ALPHABET`, so a character offset in
  an answer is a token offset, and teacher and student share a tokenizer fingerprint.
- **The teacher** (4 layers, hidden 128) learns from answers that carry its preferred tags (9 in 10 times;
  else another valid tag), with the loss on each tag weighted x`tag_weight`: a decision is one token in ~100,
  and unweighted it drowns. A share of its answers carry tags drawn blindly, with no loss on those tags, so it
  carries out any decision it is handed and scores a student's wrong-decision rollouts on the numbers that
  follow, not on arithmetic it never saw.
- **The student** (2 layers, hidden 96) is warmed up on answers with blind tags: it learns to carry out every
  tag and no rule for choosing one, so it starts near the blind rate and gets every answer right when it is
  told the decision (its "execution").
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from services.models.decisions import ALPHABET, DECISION_TASKS, DecisionTask

SHIPPED = Path(__file__).resolve().parent / "pairs"
MAX_ANSWER_TOKENS = 120
"""Longer than any decision-task answer (98 and 110 characters, plus EOS)."""


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
    tag_weight: float = 1.0
    """Loss weight of the tag tokens of answers with chosen (not blind) tags."""
    blind_share: float = 1.0
    """Share of the training answers whose tags are drawn blindly (no loss on those tags for the teacher)."""
    tag_batch: int = 0
    """Extra rows per step that train one decision only: a prompt, the teacher's answer up to a decision
    point, and the loss on that tag (cheap: route's row is 18 tokens), so that the rule is seen often."""


STUDENT = Recipe(2, 96, 4, 1000, seed=2)
RECIPES = {
    "route": {"teacher": Recipe(4, 128, 4, 3000, seed=1, blind_share=0.3, tag_batch=256), "student": STUDENT},
    # relay's answers carry 4 decisions each, and a tag row is as long as the answer up to its block
    "relay": {
        "teacher": Recipe(4, 128, 4, 3000, seed=1, blind_share=0.3, tag_batch=128),
        "student": STUDENT,
    },
}
"""Task -> role -> recipe."""


def build_tokenizer():
    from services.models.testbed import build_tokenizer as char_tokenizer

    return char_tokenizer(ALPHABET)


def training_row(
    task: DecisionTask, x, role: str, recipe: Recipe, rng: random.Random
) -> tuple[str, list[float]]:
    """(answer text, loss weight per answer character) of one training answer of `role`."""
    blind = rng.random() < recipe.blind_share
    text = task.answer(x, task.blind_tags(rng)) if blind else task.teacher_sample(x, rng)
    weights = [1.0] * len(text)
    for p in task.points:
        if role == "teacher":
            weights[p] = 0.0 if blind else recipe.tag_weight
    return text, weights


def _batch(rows: list[tuple[list[int], list[int], list[float]]], pad: int):
    """(ids (B, S), target ids (B, S), weights (B, S)) of (prompt, answer, answer weights) rows, right-padded;
    the target of column s is the token at s + 1, weight 0 on the prompt and the padding."""
    import torch

    S = max(len(p) + len(a) for p, a, _ in rows)
    ids_BS = torch.full((len(rows), S), pad)
    tgt_BS = torch.full((len(rows), S), pad)
    w_BS = torch.zeros((len(rows), S))
    for i, (p, a, w) in enumerate(rows):
        seq = p + a
        ids_BS[i, : len(seq)] = torch.tensor(seq)
        tgt_BS[i, : len(seq) - 1] = torch.tensor(seq[1:])
        w_BS[i, len(p) - 1 : len(seq) - 1] = torch.tensor(w)
    return ids_BS, tgt_BS, w_BS


def tag_row(task: DecisionTask, x, rng: random.Random) -> tuple[str, list[float]]:
    """(answer text up to one decision point, loss weights: 1 on that tag only) of a teacher answer."""
    text = task.teacher_sample(x, rng)
    p = rng.choice(task.points)
    return text[: p + 1], [0.0] * p + [1.0]


def fresh_prompt(task: DecisionTask, rng: random.Random):
    """A prompt drawn anew from the training split's digit pairs (never a validation or held-out pair)."""
    owned = set().union(*task.split_pairs().values())
    return task._draw(rng, [p for p in range(100) if p not in owned], None)


def _loss(model, rows, pad: int):
    """Weighted cross-entropy of (prompt ids, answer ids, answer weights) rows, over their total weight."""
    import torch.nn.functional as F

    ids_BS, tgt_BS, w_BS = _batch(rows, pad)
    logits_BSV = model(input_ids=ids_BS).logits
    nll_BS = F.cross_entropy(logits_BSV.transpose(1, 2), tgt_BS, reduction="none")
    return (nll_BS * w_BS).sum() / w_BS.sum()


def supervised_train(model, tokenizer, task: DecisionTask, role: str, recipe: Recipe, progress=None) -> None:
    """AdamW (betas 0.9/0.98, wd 0.01), warm-up then cosine, clip 1.0; weighted cross-entropy on the answer
    tokens (EOS included), plus the tag rows' loss when the recipe has them. Prompts are drawn fresh from the
    training split's digit pairs every step, so nothing can be learned by heart."""
    import torch

    rng = random.Random(recipe.seed)
    enc = tokenizer.convert_tokens_to_ids
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    for step in range(recipe.steps):
        warm = min(1.0, (step + 1) / recipe.warmup_steps)
        for group in opt.param_groups:
            group["lr"] = recipe.lr * warm * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        rows, tags = [], []
        for _ in range(recipe.batch_size):
            x = fresh_prompt(task, rng)
            text, w = training_row(task, x, role, recipe, rng)
            rows.append((enc(list(task.prompt(x))), enc(list(text)) + [tokenizer.eos_token_id], w + [1.0]))
        for _ in range(recipe.tag_batch):
            x = fresh_prompt(task, rng)
            text, w = tag_row(task, x, rng)
            tags.append((enc(list(task.prompt(x))), enc(list(text)), w))
        loss = _loss(model, rows, tokenizer.pad_token_id)
        if tags:
            loss = loss + _loss(model, tags, tokenizer.pad_token_id)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    model.eval()


class ForceTokens:
    """A transformers logits processor: at answer offset t of row i, only `forced[i][t]` may be written."""

    def __init__(self, prompt_len: int, forced: list[dict[int, int]]) -> None:
        self.prompt_len, self.forced = prompt_len, forced

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_len
        for i, row in enumerate(self.forced):
            if t in row:
                keep = scores[i, row[t]].clone()
                scores[i] = float("-inf")
                scores[i, row[t]] = keep
        return scores


def greedy_answers(model, tokenizer, task: DecisionTask, xs, forced=None, batch_size: int = 126) -> list[str]:
    """Greedy answers to prompts `xs` (all of one length); `forced(x)` -> {answer offset: character} writes
    those characters instead of the model's choice there."""
    import torch
    from transformers import LogitsProcessorList

    enc = tokenizer.convert_tokens_to_ids
    texts = []
    for s in range(0, len(xs), batch_size):
        chunk = xs[s : s + batch_size]
        ids = torch.tensor([enc(list(task.prompt(x))) for x in chunk])
        procs = LogitsProcessorList()
        if forced is not None:
            rows = [{t: enc(ch) for t, ch in forced(x).items()} for x in chunk]
            procs.append(ForceTokens(ids.shape[1], rows))
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, max_new_tokens=MAX_ANSWER_TOKENS, do_sample=False, logits_processor=procs
            )
        texts += [tokenizer.decode(r, skip_special_tokens=True) for r in out[:, ids.shape[1] :]]
    return texts


def measure(model, tokenizer, task: DecisionTask, split: str = "heldout") -> dict:
    """Accuracy, agreement of each decision with the designed preference, and execution (accuracy with the
    preferred tags forced) of a model on a split."""
    xs = task.split()[split]
    answers = greedy_answers(model, tokenizer, task, xs)
    forced = greedy_answers(
        model, tokenizer, task, xs, lambda x: dict(zip(task.points, task.teacher_tags(x), strict=True))
    )
    n, d = len(xs), len(xs) * task.blocks
    agree = sum(
        a == b
        for x, t in zip(xs, answers, strict=True)
        for a, b in zip(task.decisions(t), task.teacher_tags(x), strict=True)
    )
    return {
        "accuracy": sum(task.check(x, t) for x, t in zip(xs, answers, strict=True)) / n,
        "agreement_with_rule": agree / d,
        "execution": sum(task.check(x, t) for x, t in zip(xs, forced, strict=True)) / n,
    }


def _build_model(task: DecisionTask, role: str, recipe: Recipe, tokenizer, out: Path, say) -> dict:
    """Trains one model of the pair into `out`; returns its build record (figures on both evaluation splits)."""
    from rich.progress import Progress

    from services.models.testbed import new_model

    t0 = time.perf_counter()
    model = new_model(recipe, tokenizer)
    with Progress(transient=True) as bar:
        job = bar.add_task(f"{task.name} {role}", total=recipe.steps)

        def advance(step: int, loss: float) -> None:
            bar.update(job, completed=step, description=f"{task.name} {role} loss {loss:.3f}")

        supervised_train(model, tokenizer, task, role, recipe, advance)
    build_s = round(time.perf_counter() - t0, 1)
    figures = {split: measure(model, tokenizer, task, split) for split in ("validation", "heldout")}
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    say(f"{task.name} {role}: held-out {figures['heldout']} ({build_s:.0f} s)")
    return {
        "recipe": asdict(recipe),
        "parameters": sum(p.numel() for p in model.parameters()),
        **figures,
        "build_s": build_s,
    }


def build_pair(name: str, out: Path, say=print) -> tuple[Path, Path]:
    """Trains the pair of decision task `name` from its seeds into out/teacher and out/student; writes
    out/build.json. Deterministic on a given machine (one torch thread)."""
    import torch

    task = DECISION_TASKS[name]
    tokenizer = build_tokenizer()
    report: dict = {"task": f"builtin:{name}", "torch_threads": torch.get_num_threads()}
    for role in ("teacher", "student"):
        report[role] = _build_model(task, role, RECIPES[name][role], tokenizer, out / role, say)
    (out / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    return out / "teacher", out / "student"
