"""The token counter as a service (`POST /bp-train/v1/tokens`, the Tokens tab): checked fields, bounded work.

Every field is checked on its own and a bad one is a `BPError` naming it (the API answers 400); the count runs
within `PromptLimits` (prompt length, bracket nesting, schedule expansion, word lengths, a time budget), and
at most `MAX_CONCURRENT` counts run at once in the process (`counting_slot`; the API answers 429 to the
next one), so requests cannot pile up work. See docs/tokens.md, "Limits".
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Optional

from bp_trainer.errors import BPError
from bp_trainer.tokens.limits import DEFAULT_LIMITS, DEFAULT_STEPS, PromptLimits, parse_steps

FIELDS = ("text", "steps", "negative", "with_ids")
MAX_CONCURRENT = 2  # counts running at once in this process (each is bounded by PromptLimits.time_s)
WAIT_S = 1.0  # how long a count waits for a free slot before it is refused
# A JSON body holding the longest allowed prompt, even with every character escaped (\uXXXX), and a margin.
MAX_BODY_BYTES = DEFAULT_LIMITS.max_chars * 6 + 4096

_SLOTS = threading.BoundedSemaphore(MAX_CONCURRENT)


class TokensBusy(Exception):
    """Every counting slot stayed busy for `WAIT_S`: try again shortly (HTTP 429). Not a BPError on purpose:
    it is no fault of the request."""


@dataclass(frozen=True)
class TokensRequest:
    text: str
    steps: int = DEFAULT_STEPS
    negative: bool = False
    with_ids: bool = False

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> "TokensRequest":
        """The request from a decoded JSON object; a BPError naming the first bad field."""
        unknown = [k for k in body if k not in FIELDS]
        if unknown:
            near = difflib.get_close_matches(str(unknown[0]), FIELDS, n=1)
            raise BPError("unknown field", path=repr(str(unknown[0])[:40]),
                          hint=f"did you mean '{near[0]}'?" if near else f"fields: {', '.join(FIELDS)}")
        text = body.get("text")
        if text is None:
            raise BPError("'text' (the prompt to inspect) is required")
        if not isinstance(text, str):
            raise BPError(f"must be a string (the prompt), not {_json_type(text)}", path="'text'")
        return cls(text=text, steps=parse_steps(body.get("steps")), negative=_flag(body, "negative"),
                   with_ids=_flag(body, "with_ids"))


def _json_type(value: Any) -> str:
    names = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _flag(body: Mapping[str, Any], field: str) -> bool:
    value = body.get(field)
    if value is None:
        return False
    if not isinstance(value, bool):
        shown = repr(value[:20]) if isinstance(value, str) else _json_type(value)
        raise BPError(f"must be true or false, not {shown}", path=f"'{field}'")
    return value


def oversized_body(content_length: Optional[str]) -> Optional[str]:
    """The 413 message for a request body declared larger than any valid one (refused before it is read)."""
    if content_length and content_length.strip().isdigit() and int(content_length) > MAX_BODY_BYTES:
        return (f"'text': the request body is {int(content_length)} bytes, at most {MAX_BODY_BYTES} "
                f"(a prompt has at most {DEFAULT_LIMITS.max_chars} characters)")
    return None


@contextlib.contextmanager
def counting_slot() -> Iterator[None]:
    """Hold one of the `MAX_CONCURRENT` counting slots; TokensBusy when none frees up within `WAIT_S`."""
    if not _SLOTS.acquire(timeout=WAIT_S):
        raise TokensBusy(f"{MAX_CONCURRENT} token counts are already running; try again in a moment")
    try:
        yield
    finally:
        _SLOTS.release()


def answer_tokens(body: Mapping[str, Any], tokenizer: Callable[[], Any], settings: Mapping[str, Any],
                  limits: Optional[PromptLimits] = None) -> dict:
    """The `/tokens` answer (`inspect_prompt`'s dict) for a decoded JSON body.

    `tokenizer` is called only once the request is valid and a slot is free; `settings` are the host's prompt
    settings (`bp_trainer.ui.host.prompt_settings_of`); `limits` default to `DEFAULT_LIMITS`.
    """
    from bp_trainer.tokens.inspect import inspect_prompt

    request = TokensRequest.from_json(body)
    limits = limits or DEFAULT_LIMITS
    limits.check_prompt(request.text)  # before waiting for a slot: a hopeless prompt goes at once
    with counting_slot():
        loaded = tokenizer()  # may load it: not part of the count's time budget, which starts now
        return inspect_prompt(request.text, loaded, steps=request.steps, negative=request.negative,
                              with_ids=request.with_ids, limits=limits.started(), **settings)


__all__ = ["TokensRequest", "TokensBusy", "answer_tokens", "counting_slot", "oversized_body", "MAX_BODY_BYTES",
           "MAX_CONCURRENT", "FIELDS"]
