"""Bounds on the work one prompt may cause, so that no prompt ties up the process that counts it.

The token counter is reachable by anyone who can reach the WebUI (the Tokens tab and `POST
/bp-train/v1/tokens`), so its cost must not depend on how hostile the prompt is. Counting is linear in the
prompt except in two places, which are bounded here:
- the WebUI's schedule grammar is parsed by lark's Earley parser, whose cost explodes with the brackets of one
  parsed piece (see `bp_trainer.tokens.schedules`): bracket nesting and the brackets, ':' and '|' of one piece
  are capped;
- schedules multiply the prompt: `[a|b]` makes one text per sampling step. The characters of all the texts the
  counter measures are capped, and steps are 1..150 (the WebUI's slider).
A time budget is checked between pieces of work, so even an unforeseen slow case ends soon with an error.
Every limit gives a one-line `BPError` (HTTP 400) naming the field and what to do.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

from bp_trainer.errors import BPError

DEFAULT_STEPS = 20
MAX_STEPS = 150  # the WebUI's "Sampling steps" slider


@dataclass(frozen=True)
class PromptLimits:
    """What one count may cost. `deadline` (a `time.monotonic()` value) is set by `started()`."""

    max_chars: int = 16_384  # characters of the prompt (~4,000 CLIP tokens of English tags, 50+ chunks)
    max_depth: int = 32  # brackets open at once
    max_schedule_marks: int = 96  # brackets, ':' and '|' in one piece the schedule grammar must parse
    max_expanded_chars: int = 2_000_000  # characters of all schedule/AND texts the counter measures
    max_word_work: int = 2_000_000  # sum of squared UTF-8 lengths of the distinct long words (see check_words)
    time_s: Optional[float] = 5.0  # the whole count, checked between pieces of work
    field: str = "text"  # the request field (or option) the prompt came from, named in errors
    deadline: Optional[float] = None

    def started(self) -> "PromptLimits":
        """These limits with the clock started (idempotent: a started budget keeps its deadline)."""
        if self.deadline is not None or self.time_s is None:
            return self
        return dataclasses.replace(self, deadline=time.monotonic() + self.time_s)

    def fail(self, problem: str, hint: str) -> BPError:
        return BPError(problem, path=f"'{self.field}'", hint=hint)

    def check_prompt(self, text: str) -> None:
        """Length and bracket nesting of a prompt (linear; before any other work)."""
        from bp_trainer.tokens.attention import bracket_depth

        if len(text) > self.max_chars:
            raise self.fail(f"the prompt is {len(text)} characters long, at most {self.max_chars}",
                            "shorten it; the WebUI reads at most a few hundred tokens per chunk anyway")
        depth = bracket_depth(text)
        if depth > self.max_depth:
            raise self.fail(f"brackets are nested {depth} deep, at most {self.max_depth}",
                            "close them, or escape literal brackets as \\( \\) \\[ \\]")

    def check_schedule_piece(self, piece: str, balanced: bool) -> None:
        """A piece the schedule grammar must parse: at most `max_schedule_marks` brackets, ':' and '|'."""
        marks = sum(piece.count(c) for c in "()[]:|")
        if marks <= self.max_schedule_marks:
            return
        if not balanced:
            raise self.fail(f"the prompt's brackets do not balance and it has {marks} brackets, ':' and '|' "
                            f"to read as one schedule, at most {self.max_schedule_marks}",
                            "close every bracket (or escape literal ones as \\( \\[) so each group is read alone")
        raise self.fail(f"one part read as a schedule has {marks} brackets, ':' and '|', at most "
                        f"{self.max_schedule_marks}: {_excerpt(piece)}",
                        "put a space or a comma between bracket groups, or split the group")

    def check_expansion(self, texts: int, length: int) -> None:
        """Before building `texts` schedule texts of about `length` characters each."""
        if texts * length > self.max_expanded_chars:
            raise self.fail(f"the schedules make {texts} texts of {length} characters to count "
                            f"(at most {self.max_expanded_chars} characters in all)",
                            "use fewer steps, fewer [a|b] alternations, or a shorter prompt")

    def check_words(self, texts: Iterable[str], clean: Callable[[str], str]) -> None:
        """Words the tokenizer must cut with BPE: the WebUI's (slow, Python) CLIP tokenizer takes time quadratic
        in the length of a run of letters or of punctuation (4,000 letters: 2 s), so the squared UTF-8 lengths of
        the distinct long runs, in the text as the tokenizer cleans it (`clean`), are capped."""
        runs = {m.group() for text in texts for pattern in _LONG_RUNS for m in pattern.finditer(clean(text))}
        if sum(len(r.encode("utf-8")) ** 2 for r in runs) > self.max_word_work:
            longest = max(runs, key=len)
            raise self.fail(f"it has runs of letters or punctuation without spaces too long to tokenize "
                            f"({_excerpt(longest, 20)}: {len(longest)} characters)", "put spaces between words")

    def check_time(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise self.fail(f"counting this prompt took longer than {self.time_s:g} s and was stopped",
                            "simplify its schedules and bracket groups")


DEFAULT_LIMITS = PromptLimits()
# Runs of one CLIP pre-token class (letters; punctuation) long enough to matter: shorter ones cost little each.
_LONG_RUNS = (re.compile(r"[^\W\d_]{64,}"), re.compile(r"(?:[^\w\s]|_){64,}"))


def _excerpt(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "…")


def parse_steps(value: Any, field: str = "steps") -> int:
    """The one rule for sampling steps: absent (None or "") means 20; otherwise a whole number 1..150
    (a JSON number, or its digits as a string); 0, negative, fractional or huge values are refused."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return DEFAULT_STEPS
    number: Any = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if isinstance(number, float) and math.isfinite(number) and number == int(number):  # 20.0
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or not 1 <= number <= MAX_STEPS:
        raise BPError(f"must be a whole number of sampling steps from 1 to {MAX_STEPS}, not {_excerpt(str(value))}",
                      path=f"'{field}'", hint=f"leave it out for {DEFAULT_STEPS}")
    return number


__all__ = ["PromptLimits", "DEFAULT_LIMITS", "DEFAULT_STEPS", "MAX_STEPS", "parse_steps"]
