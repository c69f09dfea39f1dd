"""What /v1/compare and /v1/rescue do: the served students, the teacher client, the model-dependent checks, and
the calls into trainer.analysis (the one implementation of each analysis, shared with bench/paper_table.py).

Requests arrive checked in shape (services.app.analysis_api's pydantic models); here they are checked against
the models (token ids against both vocabularies, lengths against the teacher's context and memory guard, by the
teacher's own `validate_request`), run, and turned into response bodies. Every user error is an InvalidRequest
naming the request field, so the HTTP layer answers 400 in the `{"error": {"param", "message"}}` shape.

The teacher is reached like any client would, through its gRPC address (TeacherIO); the students are loaded once
in this process, each behind a lock (one analysis at a time per student: its forward passes use every core).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from services.teacher.client import ClientOptions
from services.teacher.errors import InvalidRequest
from services.teacher.textapi import TokenTexts, resolve_ids
from services.teacher.types import ModelInfo, ScoreRequest
from services.teacher.validation import validate_request
from trainer import analysis
from trainer.losses import Need
from trainer.sampling import pad_id_of
from trainer.tasks import BUILTIN, Example, load_task, render
from trainer.teacher_io import AbandonableTeacher, TeacherIO, TeacherMismatch, check_teacher


@dataclass
class Student:
    """A student model served for analysis."""

    name: str
    path: str
    model: object
    tokenizer: object
    texts: TokenTexts
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def vocab(self) -> int:
        """Token ids the student can read (its embedding rows)."""
        return int(self.model.get_input_embeddings().num_embeddings)

    def card(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "vocab_size": self.vocab,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def student_specs(specs: Sequence[str]) -> list[tuple[str, str]]:
    """`PATH` or `NAME=PATH` -> (name, path); a name defaults to the folder's name, made unique with -2, -3..."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or spec, spec
        base, n = name, 2
        while name in {taken for taken, _ in out}:
            name, n = f"{base}-{n}", n + 1
        out.append((name, path))
    return out


def load_students(specs: Sequence[str], device: str = "cpu") -> dict[str, Student]:
    """Loads every `--student` (float32, eval mode) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.util.progress import quiet_progress_bars

    quiet_progress_bars()
    students = {}
    for name, path in student_specs(specs):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        students[name] = Student(name, str(path), model, tokenizer, TokenTexts(tokenizer))
    return students


def _renamed(err: InvalidRequest, names: dict[str, str]) -> InvalidRequest:
    """`err` with its field renamed to the one the analysis request used (e.g. prompt_token_ids -> prompt)."""
    return InvalidRequest(err.message, names.get(err.param, err.param))


class AnalysisService:
    """The students, one teacher client and the three analyses; thread-safe (the HTTP layer calls it in threads)."""

    def __init__(
        self, teacher_target: str, students: dict[str, Student], options: ClientOptions | None = None
    ) -> None:
        assert students, "an analysis service needs at least one student"
        self.students = students
        self.teacher = TeacherIO(teacher_target, options or ClientOptions())
        self._info: ModelInfo | None = None
        self._checked: set[tuple[str, Need]] = set()
        self._lock = threading.Lock()

    def close(self) -> None:
        self.teacher.close()

    # -- models ------------------------------------------------------------------------------------------------
    def info(self) -> ModelInfo:
        """The teacher's ModelInfo (asked once; a TeacherError such as UNAVAILABLE if it cannot be reached)."""
        if self._info is None:
            self._info = self.teacher.model_info()
        return self._info

    def student(self, name: str | None, need: Need) -> Student:
        """The student `name` (the only one when None), checked once against the teacher for `need`."""
        if name is None:
            if len(self.students) > 1:
                raise InvalidRequest(f"`student` is required: one of {sorted(self.students)}.", "student")
            name = next(iter(self.students))
        if name not in self.students:
            raise InvalidRequest(
                f"`student` must be one of {sorted(self.students)}, got {name!r}.", "student"
            )
        s = self.students[name]
        if (name, need) not in self._checked:
            try:
                check_teacher(
                    self.info(), s.tokenizer, s.model.config.vocab_size, student=s.path, need=need, top_k=1
                )
            except TeacherMismatch as err:
                raise InvalidRequest(str(err), "student") from None
            with self._lock:
                self._checked.add((name, need))
        return s

    def describe(self) -> dict:
        """GET /v1/analysis: the students, the built-in tasks, and the teacher (or why it cannot be reached)."""
        try:
            info = self.info()
            teacher = {"model": info.model_id, "vocab_size": info.vocab_size, "max_top_k": info.max_top_k}
        except Exception as err:  # shown on the page; the analyses themselves answer 503
            teacher = {"error": getattr(err, "message", None) or str(err)}
        return {
            "teacher": teacher,
            "students": [s.card() for s in self.students.values()],
            "tasks": [f"builtin:{name}" for name in BUILTIN],
        }

    def _fits(
        self, s: Student, prompt, completion, *, top_k: int, full: bool, names: dict[str, str], job_id: str
    ) -> None:
        """Checks of one planned scoring before any work: the job id, ids < both vocabularies, the teacher's
        context, top_k and full-row guard (by the teacher's own `validate_request`)."""
        for param, ids in (("prompt_token_ids", prompt), ("completion_token_ids", completion)):
            if len(ids) and max(ids) >= s.vocab:
                raise InvalidRequest(
                    f"`{names.get(param, param)}` must be < the student's vocab_size {s.vocab}, got token id "
                    f"{max(ids)}.",
                    names.get(param, param),
                )
        try:
            req = ScoreRequest(
                np.asarray(prompt), np.asarray(completion), job_id=job_id, top_k=top_k, full=full
            )
            validate_request(req, self.info())
        except InvalidRequest as err:
            raise _renamed(err, names) from None

    # -- the analyses ------------------------------------------------------------------------------------------
    def compare_one(self, body, teacher: AbandonableTeacher | None = None) -> dict:
        """POST /v1/compare, single form: one prompt, a given or student-generated completion, per token.
        `teacher`: the caller's view of the teacher (an AbandonableTeacher), default this service's client."""
        teacher = teacher or self.teacher
        s = self.student(body.student, Need.FULL)
        gen = body.generate
        given = sum(x is not None for x in (body.completion, body.completion_token_ids, gen))
        if given != 1:
            raise InvalidRequest(
                "exactly one of `completion`, `completion_token_ids` and `generate` must be given.",
                "completion",
            )
        if gen is None:
            prompt, completion = resolve_ids(
                s.tokenizer, body.prompt, body.prompt_token_ids, body.completion, body.completion_token_ids
            )
        else:  # the completion is the student's answer, written below
            prompt, _ = resolve_ids(s.tokenizer, body.prompt, body.prompt_token_ids, None, [0])
        given_as = "generate.max_tokens" if gen else "completion" if body.completion is not None else ""
        names = {"prompt_token_ids": "prompt" if body.prompt is not None else "prompt_token_ids"}
        names["completion_token_ids"] = names["full"] = given_as or "completion_token_ids"
        planned = [0] * gen.max_tokens if gen else completion
        self._fits(s, prompt, planned, top_k=body.top_k, full=True, names=names, job_id=body.job_id)
        with s.lock:
            if gen is not None:
                completion = analysis.student_answer(
                    s.model, s.tokenizer, prompt, gen.max_tokens, temperature=gen.temperature, seed=gen.seed
                )
            cmp = analysis.compare_tokens(
                s.model,
                prompt,
                completion,
                teacher,
                top_k=body.top_k,
                job_id=body.job_id,
                pad_id=pad_id_of(s.tokenizer),
            )
        return self._comparison_body(s, prompt, cmp, generated=gen is not None)

    def _comparison_body(
        self, s: Student, prompt: list[int], cmp: analysis.TokenComparison, generated: bool
    ) -> dict:
        tokens = []
        for t, tid in enumerate(cmp.token_ids):
            top = [
                {"token_id": i, "token": s.texts(i), "teacher_logprob": tl, "student_logprob": sl}
                for i, tl, sl in zip(
                    cmp.top_ids[t], cmp.top_teacher_logprobs[t], cmp.top_student_logprobs[t], strict=True
                )
            ]
            tokens.append(
                {
                    "token_id": tid,
                    "token": s.texts(tid),
                    "teacher_logprob": cmp.teacher_logprobs[t],
                    "student_logprob": cmp.student_logprobs[t],
                    "reverse_kl": cmp.reverse_kl[t],
                    "forward_kl": cmp.forward_kl[t],
                    "top": top,
                }
            )
        return {
            "model": self.info().model_id,
            "student": s.name,
            "prompt_token_ids": [int(i) for i in prompt],
            "generated": generated,
            "completion": s.tokenizer.decode(cmp.token_ids),
            "total": {"reverse_kl": float(sum(cmp.reverse_kl)), "forward_kl": float(sum(cmp.forward_kl))},
            "tokens": tokens,
        }

    def _examples(self, s: Student, body, *, with_answers: bool) -> tuple[list[Example], list[list[int]]]:
        """The prompts of a batch or rescue request (a built-in task's held-out prompts, or the body's), rendered
        for the student."""
        if (body.task is None) == (body.prompts is None):
            raise InvalidRequest("exactly one of `task` and `prompts` must be given.", "task")
        if body.task is not None:
            try:
                held = load_task(body.task).heldout
            except ValueError as err:
                raise InvalidRequest(str(err).replace("`prompts`", "`task`"), "task") from None
            if body.count > len(held):
                raise InvalidRequest(
                    f"`count` must be <= {len(held)} for {body.task}, got {body.count}.", "count"
                )
            examples = held[: body.count]
        else:
            if "count" in body.model_fields_set:
                raise InvalidRequest(
                    "`count` goes with `task`; with `prompts` every prompt is used.", "count"
                )
            examples = [Example(p.prompt, p.answer) if with_answers else Example(p) for p in body.prompts]
        try:
            ids = [render(ex, s.tokenizer, body.prompt_format) for ex in examples]
        except ValueError as err:
            raise InvalidRequest(str(err), "prompt_format") from None
        for i, p in enumerate(ids):
            if not p:
                raise InvalidRequest(
                    f"`prompts[{i}]` must not be empty (it tokenizes to no tokens).", f"prompts[{i}]"
                )
        return examples, ids

    def compare_batch(self, body, teacher: AbandonableTeacher | None = None) -> dict:
        """POST /v1/compare, batch form: mean exact KL by position over the student's sampled answers.
        `teacher`: the caller's view of the teacher (an AbandonableTeacher), default this service's client."""
        teacher = teacher or self.teacher
        s = self.student(body.student, Need.FULL)
        _, ids = self._examples(s, body, with_answers=False)
        for i, p in enumerate(ids):
            where = f"prompts[{i}]" if body.prompts is not None else "task"
            names = {
                "prompt_token_ids": where,
                "completion_token_ids": "max_new_tokens",
                "full": "max_new_tokens",
            }
            self._fits(s, p, [0] * body.max_new_tokens, top_k=0, full=True, names=names, job_id=body.job_id)
        with s.lock:
            kl = analysis.kl_by_position(
                s.model,
                s.tokenizer,
                ids,
                teacher,
                max_new_tokens=body.max_new_tokens,
                vocab=self.info().vocab_size,
                job_id=body.job_id,
                temperature=body.temperature,
                seed=body.seed,
            )
        reached = max((t + 1 for t, c in enumerate(kl.count_by_position) if c > 0), default=0)
        return {
            "model": self.info().model_id,
            "student": s.name,
            "prompts": len(ids),
            "max_new_tokens": body.max_new_tokens,
            "mean_kl_by_position": kl.mean_by_position[:reached],
            "count_by_position": kl.count_by_position[:reached],
            "share_within": kl.shares()[:reached],
        }

    def rescue(self, body, teacher: AbandonableTeacher | None = None) -> dict:
        """POST /v1/rescue: the student's accuracy when it continues a teacher-written prefix of each length.
        `teacher`: the caller's view of the teacher (an AbandonableTeacher), default this service's client."""
        teacher = teacher or self.teacher
        s = self.student(body.student, Need.TOPK)
        for i, L in enumerate(body.lengths):
            if L > body.max_new_tokens:
                raise InvalidRequest(
                    f"`lengths[{i}]` must be <= max_new_tokens {body.max_new_tokens}, got {L}.",
                    f"lengths[{i}]",
                )
        examples, ids = self._examples(s, body, with_answers=True)
        for i, p in enumerate(ids):
            where = f"prompts[{i}]" if body.prompts is not None else "task"
            names = {"prompt_token_ids": where, "completion_token_ids": "max_new_tokens"}
            self._fits(s, p, [0] * body.max_new_tokens, top_k=1, full=False, names=names, job_id=body.job_id)
        lengths = sorted(set(body.lengths))
        with s.lock:
            res = analysis.rescue_curve(
                s.model,
                s.tokenizer,
                examples,
                ids,
                teacher,
                lengths,
                max_new_tokens=body.max_new_tokens,
                job_id=body.job_id,
                n_examples=body.examples,
            )
        return {
            "model": self.info().model_id,
            "student": s.name,
            "prompts": len(ids),
            "max_new_tokens": body.max_new_tokens,
            "curve": [
                {"length": L, "accuracy": res.accuracy[L], "examples": res.examples[L]} for L in lengths
            ],
        }
