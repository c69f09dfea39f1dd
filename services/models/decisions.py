"""The testbed's decision tasks: answers of ~100 characters whose decisions are computed from the prompt.

They replace `plan` and `chain` (services.models.rules), where a prompt-independent answer was valid: the
untrained student with one token forced (`plan`) or banned (`chain`) scored 100%. Here no fixed token, banned
token or constant choice scores, because every option at every decision point is wrong for at least a third
of the prompts, and the right choice is a sum over several digits of the prompt (not a lookup of one).

Both tasks carry out a decision the same way, the execution: an answer's numbers are three digits that each
move by the tag's step k modulo 10 (`a` = +1, `b` = +3, `c` = +7, `d` = +9: each step visits every digit), a
local rule a small model learns once and applies to any tag it is given. A decision reads the digit sum s of a
group of three prompt digits: the valid tags are the two whose index in `abcd` has the parity of s (so each
tag is wrong for half the prompts), and the teacher prefers the (s mod 4)-th.

- `route` (task A, the decision comes first): `R 3 7 1 : 4 2 8 =` is answered with one tag and 24 numbers
  starting from 428 (`b: 751 084 ...`): s = 3 + 7 + 1 = 11, valid `b` and `d`, the teacher's `d`. The first
  token decides the whole answer.
- `relay` (task B, the decisions recur, each different): `L 371 942 856 : 416 =` is answered with 3 blocks,
  each a tag and 8 numbers continuing from the block before (`b: ... |a: ... |d: ...`). Block j's tag reads
  the j-th group: a right first tag says nothing about the second.

An answer is correct when every tag is valid and every number follows from its tag. Several answers are valid
for every prompt; the teacher was trained to prefer one (`teacher_tags`), while a gold answer (`gold`, what
SFT trains on) draws uniformly among the valid tags: it carries the validity rule, not the preference.

Splits are compositional: a prompt's split is decided by its first two digits (validation and held-out take
18 of the 100 pairs each, balanced by their sum), so a held-out prompt combines digits in a way no training prompt does. Pure Python.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

STEPS = {"a": 1, "b": 3, "c": 7, "d": 9}
"""Tag -> the step each digit of the next number moves by (mod 10)."""
ALPHABET = "0123456789 :=|RL" + "".join(STEPS)
"""Every character the decision tasks write: the testbed tokenizer's vocabulary (one token per character)."""
PREFERRED = 0.9
"""How often the teacher's training answers carry its preferred tag (else another valid one)."""
SPLIT_PAIRS = {"validation": 20, "heldout": 20}
"""How many of the 100 (first digit, second digit) pairs each evaluation split owns (5 of each sum mod 4)."""

Digits = tuple[int, ...]


def walk(start: Digits, tag: str, count: int) -> list[Digits]:
    """The `count` numbers after `start`: each digit moves by the tag's step, modulo 10."""
    out, x = [], start
    for _ in range(count):
        x = tuple((d + STEPS[tag]) % 10 for d in x)
        out.append(x)
    return out


def _numbers(xs: list[Digits]) -> str:
    return "".join(" " + "".join(map(str, x)) for x in xs)


@dataclass(frozen=True)
class DecisionTask:
    """A task whose answers take a few decisions (tags at fixed answer positions) and carry them out."""

    name: str
    marker: str
    groups: int
    """Decision digit groups in the prompt (one per decision for relay; route reads one group)."""
    group_size: int
    options: str
    """The tags a decision chooses from."""
    blocks: int
    numbers: int
    """Numbers per block (route: one block of 24)."""
    seed: int
    sizes: tuple[int, int, int] = (4000, 252, 252)
    """(training, validation, held-out) prompts (the last two multiples of 4, for balance)."""

    # -- prompts ------------------------------------------------------------------------------------------

    @property
    def n_digits(self) -> int:
        return self.groups * self.group_size + 3

    def prompt(self, x: Digits) -> str:
        g = self.group_size
        sep = "" if self.name == "relay" else " "
        groups = " ".join(sep.join(map(str, x[i * g : (i + 1) * g])) for i in range(self.groups))
        return f"{self.marker} {groups} : {sep.join(map(str, x[-3:]))} ="

    def parse(self, prompt: str) -> Digits:
        assert prompt.startswith(self.marker + " ") and prompt.endswith(" ="), prompt
        x = tuple(int(c) for c in prompt if c.isdigit())
        assert len(x) == self.n_digits, prompt
        return x

    def group(self, x: Digits, j: int) -> Digits:
        return x[j * self.group_size : (j + 1) * self.group_size]

    # -- decisions ----------------------------------------------------------------------------------------

    @property
    def points(self) -> list[int]:
        """Answer character offsets of the tags (one per block)."""
        block = 2 + 4 * self.numbers
        return [j * (block + 2) for j in range(self.blocks)]

    def _sum(self, x: Digits, j: int) -> int:
        return sum(self.group(x, j if self.groups > 1 else 0))

    def valid_tags(self, x: Digits) -> list[str]:
        """Per decision point, the valid tags in `options` order: those whose index has the parity of the
        decision group's digit sum."""
        return [
            "".join(t for i, t in enumerate(self.options) if i % 2 == self._sum(x, j) % 2)
            for j in range(self.blocks)
        ]

    def teacher_tags(self, x: Digits) -> list[str]:
        """Per decision point, the tag the teacher prefers (a valid one): the (sum mod 4)-th."""
        return [self.options[self._sum(x, j) % len(self.options)] for j in range(self.blocks)]

    def decisions(self, text: str) -> list[str | None]:
        """The tag an answer wrote at each decision point (None where the answer holds no tag there)."""
        return [text[p] if p < len(text) and text[p] in self.options else None for p in self.points]

    # -- answers ------------------------------------------------------------------------------------------

    def answer(self, x: Digits, tags: list[str]) -> str:
        assert len(tags) == self.blocks
        out, start = [], x[-3:]
        for tag in tags:
            xs = walk(start, tag, self.numbers)
            out.append(f"{tag}:{_numbers(xs)}")
            start = xs[-1]
        return " |".join(out)

    def check(self, x: Digits, text: str) -> bool:
        """Whether `text` is a correct answer: every tag valid, every number carried out from its tag."""
        tags = self.decisions(text)
        if any(t is None for t in tags):
            return False
        valid = self.valid_tags(x)
        return all(t in v for t, v in zip(tags, valid, strict=True)) and text == self.answer(x, tags)

    def is_correct(self, prompt: str, response: str) -> bool:
        return self.check(self.parse(prompt), response.strip("\n"))

    def gold(self, x: Digits) -> str:
        """The reference answer shipped with prompt x: valid tags drawn uniformly (no preference), fixed by x."""
        rng = random.Random(f"{self.name}:gold:{x}")
        return self.answer(x, [rng.choice(v) for v in self.valid_tags(x)])

    def teacher_sample(self, x: Digits, rng: random.Random) -> str:
        """A teacher training answer: the preferred tag with probability PREFERRED, else another valid one."""
        tags = []
        for pref, valid in zip(self.teacher_tags(x), self.valid_tags(x), strict=True):
            others = [t for t in valid if t != pref]
            tags.append(pref if rng.random() < PREFERRED or not others else rng.choice(others))
        return self.answer(x, tags)

    def blind_tags(self, rng: random.Random) -> list[str]:
        """Tags drawn uniformly whatever the prompt (what a student that can execute but not decide writes)."""
        return [rng.choice(self.options) for _ in range(self.blocks)]

    # -- splits -------------------------------------------------------------------------------------------

    def split_pairs(self) -> dict[str, set[int]]:
        """The (first digit, second digit) pairs, as 10 a + b, that the validation and held-out splits own:
        SPLIT_PAIRS // modulus of each class of (a + b) mod modulus, so that no split leans toward some sums."""
        rng = random.Random(f"{self.name}:pairs:{self.seed}")
        m = self.modulus
        classes = [[p for p in range(100) if (p // 10 + p % 10) % m == r] for r in range(m)]
        out: dict[str, set[int]] = {k: set() for k in SPLIT_PAIRS}
        for members in classes:
            rng.shuffle(members)
            at = 0
            for k, n in SPLIT_PAIRS.items():
                out[k].update(members[at : at + n // m])
                at += n // m
        return out

    def split_of(self, x: Digits) -> str:
        """train | validation | heldout, by the prompt's first two digits (a compositional split)."""
        pair = 10 * x[0] + x[1]
        for k, pairs in self.split_pairs().items():
            if pair in pairs:
                return k
        return "train"

    @property
    def modulus(self) -> int:
        """What a decision reads of its group's digit sum: the sum modulo this."""
        return len(self.options)

    def _draw(self, rng: random.Random, pairs: list[int], residues: list[int] | None) -> Digits:
        """A prompt whose first two digits are one of `pairs`, with each decision group's digit sum congruent
        to `residues` (modulo `modulus`; None: any)."""
        while True:
            pair = rng.choice(pairs)
            x = (pair // 10, pair % 10, *(rng.randrange(10) for _ in range(self.n_digits - 2)))
            sums = [self._sum(x, j) % self.modulus for j in range(self.blocks)]
            if residues is None or sums == residues:
                return x

    def split(self) -> dict[str, list[Digits]]:
        """{'train', 'validation', 'heldout'}: fixed, disjoint lists of prompts (digit tuples), drawn once.

        The evaluation splits are balanced: at every decision point each sum residue (hence each valid set)
        comes up equally often, so an option's share of prompts where it is wrong is exact, not a draw."""
        rng = random.Random(f"{self.name}:prompts:{self.seed}")
        owned = self.split_pairs()
        pairs = {k: sorted(v) for k, v in owned.items()}
        pairs["train"] = sorted(set(range(100)) - set().union(*owned.values()))
        out: dict[str, list[Digits]] = {}
        seen: set[Digits] = set()
        for k, n in zip(("validation", "heldout", "train"), self.sizes[1:] + self.sizes[:1], strict=True):
            perms = [rng.sample(range(n), n) for _ in range(self.blocks)]
            rows: list[Digits] = []
            while len(rows) < n:
                residues = None if k == "train" else [p[len(rows)] % self.modulus for p in perms]
                x = self._draw(rng, pairs[k], residues)
                if x not in seen:
                    seen.add(x)
                    rows.append(x)
            out[k] = rows
        return out


ROUTE = DecisionTask("route", "R", groups=1, group_size=3, options="abcd", blocks=1, numbers=24, seed=25)
RELAY = DecisionTask("relay", "L", groups=3, group_size=3, options="abcd", blocks=3, numbers=8, seed=26)
DECISION_TASKS = {t.name: t for t in (ROUTE, RELAY)}
