"""Can a prompt-independent policy score on a testbed task? The checks that come before any distillation run.

For each task's starting student, on the validation and held-out prompts, greedy answers:

    student             as it is
    forced tag o        tag o written at the first decision point (every option o): a fixed first token
    banned token c      token c never written (every token of the vocabulary)
    best constant       at each decision point the option that alone scores best there, all forced together
    told the decision   the teacher's preferred tag forced at every decision point: execution, the student's
                        skill at carrying out a decision it is handed
    teacher             the teacher's own greedy answers

The properties a task must have (issue 25): every shortcut scores at most 10 points above the student and at
least 30 points below the teacher, and every option at every decision point is wrong for at least a third of
the prompts (read off the task's rule). The withdrawn tasks `plan` and `chain` fail them; that is why they were
withdrawn. Writes docs/results/shortcuts.{md,json}.

    .venv/bin/python bench/shortcuts.py                           # route, relay, plan, chain (~5 min)
    .venv/bin/python bench/shortcuts.py --tasks route --splits validation --out /tmp/s
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MARGIN_OVER_STUDENT, MARGIN_UNDER_TEACHER, WRONG_SHARE = 0.10, 0.30, 1 / 3


def _examples(task: str, split: str):
    from trainer.tasks import load_task

    t = load_task(f"builtin:{task}")
    return (t.validation() if split == "validation" else t).heldout


def _rule(task: str):
    from trainer.tasks import _RULES

    return _RULES[task]


def accuracy(model, tok, examples, *, forced=None, banned=(), batch_size: int = 126) -> float:
    """Greedy accuracy; `forced(example)` -> {answer offset: character}; `banned`: characters never written."""
    from trainer.sampling import generate, pad_id_of
    from trainer.tasks import render

    enc = tok.convert_tokens_to_ids
    correct = 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        rows = None if forced is None else [{t: enc(c) for t, c in forced(ex).items()} for ex in chunk]
        ro = generate(
            model,
            [render(ex, tok) for ex in chunk],
            120,
            eos_id=tok.eos_token_id,
            pad_id=pad_id_of(tok),
            temperature=0.0,
            forced=rows,
            banned=[enc(c) for c in banned],
        )
        for j, ex in enumerate(chunk):
            correct += ex.is_correct(tok.decode(ro.completion(j), skip_special_tokens=True))
    return correct / len(examples)


def wrong_shares(task: str, examples) -> list[dict[str, float]] | None:
    """Per decision point, per option: the share of prompts where the option is not valid (decision tasks)."""
    rule = _rule(task)
    if not hasattr(rule, "valid_tags"):
        return None
    valid = [rule.valid_tags(rule.parse(ex.prompt)) for ex in examples]
    return [
        {o: sum(o not in v[j] for v in valid) / len(valid) for o in rule.options}
        for j in range(len(rule.points))
    ]


def check_split(task: str, split: str, student, teacher, tok, say) -> dict:
    """Every check of one task on one split."""
    rule = _rule(task)
    examples = _examples(task, split)
    out: dict = {"prompts": len(examples)}
    out["student"] = accuracy(student, tok, examples)
    out["teacher"] = accuracy(teacher, tok, examples)
    out["forced_first"] = {
        o: accuracy(student, tok, examples, forced=lambda ex, o=o: {0: o}) for o in rule.options
    }
    vocab = [c for c in tok.get_vocab() if len(c) == 1]
    out["banned"] = {c: accuracy(student, tok, examples, banned=[c]) for c in sorted(vocab)}
    per_point = []
    for p in rule.points:
        per_point.append(
            {o: accuracy(student, tok, examples, forced=lambda ex, p=p, o=o: {p: o}) for o in rule.options}
        )
    best = {p: max(scores, key=scores.get) for p, scores in zip(rule.points, per_point, strict=True)}
    out["constant_per_point"] = per_point
    out["best_constant"] = {
        "tags": "".join(best.values()),
        "accuracy": accuracy(student, tok, examples, forced=lambda ex: best),
    }
    if hasattr(rule, "teacher_tags"):
        out["told_the_decision"] = accuracy(student, tok, examples, forced=lambda ex: ex.forced_decisions())
    out["wrong_shares"] = wrong_shares(task, examples)
    out["verdict"] = verdict(out)
    say(f"[{task} / {split}] student {out['student']:.3f} teacher {out['teacher']:.3f} best shortcut "
        f"{out['verdict']['best_shortcut']:.3f} ({out['verdict']['best_shortcut_name']}): "
        f"{'passes' if out['verdict']['passes'] else 'FAILS'}")  # fmt: skip
    return out


def verdict(r: dict) -> dict:
    """The best shortcut and whether the task has the required properties on this split."""
    shortcuts = {f"forced first tag {o}": v for o, v in r["forced_first"].items()}
    shortcuts |= {f"banned {c!r}": v for c, v in r["banned"].items()}
    shortcuts[f"constant tags {r['best_constant']['tags']}"] = r["best_constant"]["accuracy"]
    name = max(shortcuts, key=shortcuts.get)
    best = shortcuts[name]
    shares = r["wrong_shares"]
    min_wrong = None if shares is None else min(v for point in shares for v in point.values())
    passes = (
        best <= r["student"] + MARGIN_OVER_STUDENT
        and best <= r["teacher"] - MARGIN_UNDER_TEACHER
        and (min_wrong is None or min_wrong >= WRONG_SHARE - 1e-9)
    )
    return {"best_shortcut": best, "best_shortcut_name": name, "min_wrong_share": min_wrong, "passes": passes}


def report(results: dict, meta: dict) -> str:
    """docs/results/shortcuts.md: one row per task and split."""
    lines = [
        "# Can a prompt-independent answer score? The testbed's shortcut checks",
        "",
        f"Measured {meta['date']} on {meta['cpu']} in {meta['wall_s']:.0f} s (`bench/shortcuts.py`). Greedy answers of "
        "each task's **starting** student with a fixed first tag forced, each token banned everywhere, or the best "
        "constant tag at every decision point forced; 'told' forces the teacher's preferred decision at every "
        "decision point (execution). Required (issue 25): every shortcut at most 10 points above the student and "
        "at least 30 below the teacher; every option wrong for at least a third of the prompts at every decision "
        "point. `plan` and `chain` are the withdrawn testbed, shown failing.",
        "",
        "| task | split | student | teacher | told the decision | best forced first tag | best banned token | "
        "best constant tags | option wrong, least share | passes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, splits in results.items():
        for split, r in splits.items():
            ff = max(r["forced_first"], key=r["forced_first"].get)
            bb = max(r["banned"], key=r["banned"].get)
            told = r.get("told_the_decision")
            mw = r["verdict"]["min_wrong_share"]
            lines.append(
                f"| {task} | {split} | {100 * r['student']:.1f} | {100 * r['teacher']:.1f} | "
                f"{'-' if told is None else f'{100 * told:.1f}'} | {100 * r['forced_first'][ff]:.1f} (`{ff}`) | "
                f"{100 * r['banned'][bb]:.1f} (`{bb}`) | {100 * r['best_constant']['accuracy']:.1f} "
                f"(`{r['best_constant']['tags']}`) | {'-' if mw is None else f'{mw:.3f}'} | "
                f"{'yes' if r['verdict']['passes'] else '**no**'} |"
            )
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{os.cpu_count()} cores of an {line.split(':', 1)[1].strip()}"
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="route,relay,plan,chain")
    parser.add_argument("--splits", default="validation,heldout")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.models.testbed import prepare_pair
    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    torch.set_num_threads(1)
    console = Console(stderr=True)
    t0 = time.perf_counter()
    results: dict = {}
    for task in args.tasks.split(","):
        pair = prepare_pair(task)
        tok = AutoTokenizer.from_pretrained(pair.student)
        student = AutoModelForCausalLM.from_pretrained(pair.student).eval()
        teacher = AutoModelForCausalLM.from_pretrained(pair.teacher).eval()
        results[task] = {
            s: check_split(task, s, student, teacher, tok, console.print) for s in args.splits.split(",")
        }
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "wall_s": time.perf_counter() - t0}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shortcuts.json").write_text(json.dumps({"meta": meta, "tasks": results}, indent=1) + "\n")
    text = report(results, meta)
    (args.out / "shortcuts.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
