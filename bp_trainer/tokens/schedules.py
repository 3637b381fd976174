"""Prompt editing and alternation (`[a:b:0.4]`, `[a::10]`, `[a:12]`, `[a|b]`), extra networks and `AND`,
as the WebUI v1.10.1 expands them before it counts tokens (`modules/ui.py::update_token_counter`).

The WebUI parses schedules with a lark Earley grammar; the same grammar is used here (lark is imported lazily,
so the rest of `bp_trainer.tokens` works without it), because an Earley parser resolves this ambiguous grammar
in ways a hand-written parser would only approximate.

Step rules (new timelines, the WebUI default): a number written with a '.' is a fraction of the steps, an
integer is an absolute step; with `use_old_scheduling` a value below 1 is a fraction. A value is clamped to
the step count; the text before `:` is used up to and including that step.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any, Iterable

from bp_trainer.errors import BPError

if TYPE_CHECKING:
    from bp_trainer.tokens.limits import PromptLimits

# Extra networks `<lora:name:0.8>` / `<hypernet:...>` are removed before counting (extra_networks.re_extra_net).
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
# Composable diffusion: sub-prompts separated by the word AND, each with an optional ':weight' at its end.
AND_SPLIT = re.compile(r"\bAND\b")
AND_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
           | "(" prompt ":" prompt ")"
           | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


def _lark():
    try:
        import lark
    except ImportError as exc:  # pragma: no cover - lark is pinned in requirements and present in the WebUI
        raise BPError("prompt schedules need the `lark` package", hint="pip install lark==1.1.2") from exc
    return lark


@functools.lru_cache(maxsize=1)
def _parser():
    lark = _lark()
    # maybe_placeholders=True: an absent optional `[x]` is a None child, so `scheduled` always has 5 children.
    return lark.Lark(_GRAMMAR, maybe_placeholders=True)


def strip_extra_networks(text: str) -> tuple[str, list[dict[str, Any]]]:
    """The prompt without `<name:args>` tags, and those tags as `{"name", "args"}` (extra_networks.parse_prompt)."""
    found: list[dict[str, Any]] = []

    def take(m: "re.Match[str]") -> str:
        found.append({"name": m.group(1), "args": m.group(2).split(":")})
        return ""

    # A tag ends at a '>': none starts after the last one. Searching only up to it keeps the regex linear (each
    # `<x:` after the last '>' would otherwise scan to the end of the text: quadratic).
    end = text.rfind(">") + 1
    return EXTRA_NETWORK.sub(take, text[:end]) + text[end:], found


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Sub-prompts of a positive prompt split on `AND`, each with its weight (get_multicond_prompt_list).

    Equal sub-prompt texts are kept once, in first-seen order, as the WebUI's flat list does.
    """
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for sub in AND_SPLIT.split(prompt):
        text, weight = and_weight(sub)
        if text not in seen:
            seen.add(text)
            out.append((text, float(weight) if weight is not None else 1.0))
    return out


def and_weight(sub: str) -> tuple[str, str | None]:
    """`AND_WEIGHT.search(sub).groups()` (the WebUI's `re_weight`) in linear time: (text, weight or None).

    The regex's lazy prefix retries the tail `(\s*:\s*NUMBER)?\s*$` at every position (quadratic on long
    whitespace). Its answer is the shortest prefix whose rest is `\s*:\s*NUMBER\s*` (weighted) or blank.
    """
    stripped = sub.rstrip()
    colon = stripped.rfind(":")
    if colon >= 0 and _WEIGHT_TAIL.fullmatch(stripped, colon + 1):
        start = colon
        while start > 0 and sub[start - 1].isspace():
            start -= 1
        return sub[:start], stripped[colon + 1:].lstrip()
    return stripped, None


_WEIGHT_TAIL = re.compile(r"\s*([-+]?(?:\d+\.?|\d*\.\d+))")


# Text the grammar accepts without any schedule or alternation in it: no '|' and every backslash escaping a
# character other than a newline (lark's '.'). Such text is its own only schedule variant.
_PLAIN_OK = re.compile(r"(?:[^\\|]|\\[^\n])*")
# A `scheduled` node ends with ':' NUMBER ']' (lark's SIGNED_NUMBER, optional whitespace around it): text without
# this and without '|' has no schedule to expand, whatever its brackets.
_SCHEDULE_END = re.compile(r":\s*[+-]?[\d.]+(?:[eE][+-]?\d+)?\s*\]")
_OPEN = {"(": ")", "[": "]"}
_CLOSE = {")", "]"}
_MARKS = frozenset("[]():")  # the characters of the grammar's stray-bracket terminal


def _needs_parser(piece: str) -> bool:
    return bool(_SCHEDULE_END.search(piece)) or _PLAIN_OK.fullmatch(piece) is None


def split_independent(prompt: str) -> list[str]:
    """The prompt cut into its top-level bracket groups and the text between them, when its brackets are well
    nested (escapes skipped); unbalanced text is returned whole.

    See `balanced_pieces`.
    """
    return balanced_pieces(prompt) or [prompt]


def balanced_pieces(prompt: str) -> list[str] | None:
    """The top-level bracket groups of the prompt and the text between them; None when the brackets are not
    well nested.

    Every bracket pair the grammar can turn into a node encloses well-nested text, so it is a pair of this
    nesting: no node spans a top-level position except the sequences `start`/`prompt`, plain text and runs of
    stray brackets and colons (`/[][():]/+`). The prompt is cut at a top-level position only where no such run
    can cross it (not between two of `[]():`, as in `[a:2]:`), so the pieces parse independently and the
    WebUI's parse of the whole prompt is the pieces' parses side by side. Earley parsing is much slower than
    linear in the number of brackets: this keeps long prompts fast, and each parse small enough to bound
    (see `PromptLimits`).
    """
    cuts: list[int] = []
    stack: list[str] = []
    i, n = 0, len(prompt)
    while i < n:
        c = prompt[i]
        if c == "\\":
            i += 2
            continue
        if c in _OPEN:
            if not stack:
                cuts.append(i)  # before a top-level group
            stack.append(_OPEN[c])
        elif c in _CLOSE:
            if not stack or stack.pop() != c:
                return None
            if not stack:
                cuts.append(i + 1)  # after it
        i += 1
    if stack:
        return None
    cuts = [k for k in cuts if 0 < k < n and not (prompt[k - 1] in _MARKS and prompt[k] in _MARKS)]
    return [prompt[a:b] for a, b in zip([0] + cuts, cuts + [n]) if a < b] or [prompt]


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None,
                    use_old_scheduling: bool = False, *, split: bool = True,
                    limits: "PromptLimits | None" = None) -> list[tuple[int, str]]:
    """`[(last_step, text), ...]`: the text the model sees up to each step (get_learned_conditioning_prompt_schedules).

    A prompt that does not parse is used as it is for all steps, as in the WebUI. `split=False` parses the
    whole prompt at once, as the WebUI does (same result, much slower on prompts with many brackets).
    `limits` bounds the parse and the expansion (a BPError when exceeded).
    """
    if hires_steps is None or use_old_scheduling:
        int_offset, frac_offset, total = 0, 0.0, steps
    else:
        int_offset, frac_offset, total = steps, 1.0, hires_steps

    pieces = balanced_pieces(prompt) if split else None
    balanced = pieces is not None
    parts: list[Any] = []  # str (constant text) or a parse tree
    for piece in pieces or [prompt]:
        if not _needs_parser(piece):
            parts.append(piece)
            continue
        if limits is not None:
            limits.check_schedule_piece(piece, balanced)
            limits.check_time()
        tree = _simple_group(piece) or _parse_cached(piece)
        if tree is None:  # one piece cannot parse: neither can the whole prompt
            return [(total, prompt)]
        parts.append(tree)

    switch_steps, when_of = _switch_steps(parts, total, int_offset, frac_offset, use_old_scheduling)
    if limits is not None:
        limits.check_expansion(len(switch_steps), len(prompt))
    return [(step, "".join(t if isinstance(t, str) else _text_at(t, step, when_of) for t in parts))
            for step in sorted(switch_steps)]


def _switch_steps(parts: list[Any], total: int, int_offset: int, frac_offset: float,
                  use_old_scheduling: bool) -> tuple[set[int], dict[int, int]]:
    """(the steps where the text changes, {id(scheduled node): its last step with the text before ':'})."""
    switch_steps = {total}
    when_of: dict[int, int] = {}
    has_alternation = False
    for tree in parts:
        if isinstance(tree, str):
            continue
        for node in tree.iter_subtrees():
            if node.data == "scheduled":
                raw = node.children[-2]
                value = float(raw)
                if use_old_scheduling:
                    value = value * total if value < 1 else value
                elif "." in raw:
                    value = (value - frac_offset) * total
                else:
                    value = value - int_offset
                when = min(total, int(value))
                when_of[id(node)] = when
                if when >= 1:
                    switch_steps.add(when)
            elif node.data == "alternate":
                has_alternation = True
    if has_alternation:
        switch_steps.update(range(1, total + 1))
    return switch_steps, when_of


# The commonest groups, `[a:b:N]`, `[a:N]`, `[a::N]` and `[a|b|...]` with plain text inside (no brackets,
# ':', '|' or '\\'), have one parse; building it directly spares lark's Earley parser (milliseconds each).
_TEXT = r"[^\\\[\]():|]*"
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"  # lark's SIGNED_NUMBER
_SIMPLE_SCHEDULE = re.compile(rf"\[(?:({_TEXT}):)?({_TEXT}):\s*({_NUMBER})\s*\]")
_SIMPLE_ALTERNATE = re.compile(rf"\[{_TEXT}(?:\|{_TEXT})+\]")


def _simple_group(piece: str) -> Any:
    """The parse tree lark gives a simple group alone (only the parts `_switch_steps`/`_emit` read), or None."""
    m = _SIMPLE_SCHEDULE.fullmatch(piece)
    if m:
        from lark import Tree

        return Tree("scheduled", [m.group(1), m.group(2), None, m.group(3), None])
    if _SIMPLE_ALTERNATE.fullmatch(piece):
        from lark import Tree

        return Tree("alternate", [option or None for option in piece[1:-1].split("|")])
    return None


@functools.lru_cache(maxsize=4096)
def _parse_cached(piece: str) -> Any:
    """The parse tree of a piece (shared, never modified), or None when it does not parse."""
    lark = _lark()
    try:
        return _parser().parse(piece)
    except lark.exceptions.LarkError:
        return None


def _text_at(tree: Any, step: int, when_of: dict[int, int]) -> str:
    parts: list[str] = []
    _emit(tree, step, when_of, parts)
    return "".join(parts)


def _emit(node: Any, step: int, when_of: dict[int, int], parts: list[str]) -> None:
    """Append the text of `node` at `step` (recursive over depth, like the WebUI's transformer)."""
    if node is None:
        return
    if isinstance(node, str):  # a lark Token (WHITESPACE, brackets kept by `!` rules, plain text)
        parts.append(str(node))
        return
    kind = node.data
    children = node.children
    if kind == "plain":
        parts.append(str(children[0]))
    elif kind == "scheduled":
        before, after = children[0], children[1]
        _emit(before if step <= when_of[id(node)] else after, step, when_of, parts)
    elif kind == "alternate":
        options = list(children)
        _emit(options[(step - 1) % len(options)], step, when_of, parts)
    else:  # start, prompt, emphasized: their children in order
        for child in children:
            _emit(child, step, when_of, parts)


def counter_prompts(text: str, steps: int = 20, *, negative: bool = False,
                    hires_steps: int | None = None, use_old_scheduling: bool = False,
                    limits: "PromptLimits | None" = None) -> list[str]:
    """Every text the WebUI's token counter measures for this prompt (the counter shows the maximum).

    Extra networks are removed; a positive prompt is split on AND (a negative one is not); each part is
    expanded into its schedule variants. `limits` bounds the work (see `PromptLimits`).
    """
    stripped, _ = strip_extra_networks(text)
    try:
        parts = [stripped] if negative else [t for t, _ in split_and(stripped)]
        schedules = [prompt_schedule(p, steps, hires_steps, use_old_scheduling, limits=limits) for p in parts]
    except BPError:
        raise
    except Exception:  # the WebUI falls back to the raw text when expansion fails while typing
        schedules = [[(steps, stripped)]]
    if limits is not None:
        limits.check_expansion(1, sum(len(t) for schedule in schedules for _, t in schedule))
    return [t for schedule in schedules for _, t in schedule]


def unique(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(texts))
