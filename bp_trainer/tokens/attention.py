"""Emphasis weights of a prompt, as the WebUI v1.10.1 reads them (`prompt_parser.parse_prompt_attention`).

`(x)` multiplies by 1.1, `[x]` divides by 1.1, `(x:1.3)` multiplies by 1.3; `\\(`, `\\)`, `\\[`, `\\]`, `\\\\` are
literal characters; a bracket left open applies to the end of the text; neighbouring pieces of equal weight
are merged; the word `BREAK` becomes the marker `["BREAK", -1]` (forces a new 75-token chunk).

The result is the WebUI's own shape, a list of `[text, weight]` pairs, so it can be compared with its answers.
"""

from __future__ import annotations

import re
from typing import List, Union

Segment = List[Union[str, float]]  # [text, weight]

BREAK_WEIGHT = -1
ROUND = 1.1
SQUARE = 1 / 1.1

# One lexical unit per match, tried in this order (the order matters: an escape before a bracket, an explicit
# weight `:1.3)` before a plain `)`, text runs, then a lone ':').
_UNIT = re.compile(
    r"""
      \\[()\[\]\\]            # escaped bracket or backslash: literal character
    | \\                      # lone backslash: literal
    | [(\[]                   # opening bracket
    | :\s*([+-]?[.\d]+)\s*\)  # ':1.3)' closes a round bracket with an explicit weight
    | [)\]]                   # closing bracket
    | [^\\()\[\]:]+           # plain text
    | :                       # a colon that is not a weight
    """,
    re.X,
)
_BREAK_WORD = re.compile(r"\bBREAK\b")


def split_breaks(text: str) -> list[str]:
    """`re.split(r"\s*\bBREAK\b\s*", text)` (the WebUI's `re_break`) in linear time: that regex retries its
    leading `\s*` at every position of a long whitespace run (quadratic: 32,000 spaces took a minute)."""
    parts: list[str] = []
    prev_end = 0
    for m in _BREAK_WORD.finditer(text):
        start, end = m.start(), m.end()
        if start < prev_end:  # inside the previous match's trailing whitespace: impossible, BREAK is not space
            continue
        while start > prev_end and text[start - 1].isspace():
            start -= 1
        while end < len(text) and text[end].isspace():
            end += 1
        parts.append(text[prev_end:start])
        prev_end = end
    parts.append(text[prev_end:])
    return parts


def parse_prompt_attention(text: str) -> list[Segment]:
    """`[[text, weight], ...]` for a prompt, exactly as the WebUI's parser returns it."""
    out: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in out[start:]:
            item[1] *= factor

    for m in _UNIT.finditer(text):
        unit, explicit = m.group(0), m.group(1)
        if unit.startswith("\\"):
            # An escape keeps the character after the backslash; a lone backslash at the end keeps ''.
            out.append([unit[1:], 1.0])
        elif unit == "(":
            open_round.append(len(out))
        elif unit == "[":
            open_square.append(len(out))
        elif explicit is not None and open_round:
            scale(open_round.pop(), float(explicit))
        elif unit == ")" and open_round:
            scale(open_round.pop(), ROUND)
        elif unit == "]" and open_square:
            scale(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(split_breaks(unit)):
                if i:
                    out.append(["BREAK", BREAK_WEIGHT])
                out.append([part, 1.0])

    for start in open_round:
        scale(start, ROUND)
    for start in open_square:
        scale(start, SQUARE)

    if not out:
        out = [["", 1.0]]

    merged: list[list] = [out[0]]
    for item in out[1:]:
        if merged[-1][1] == item[1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


def bracket_depth(text: str) -> int:
    """The most brackets open at once, as `parse_prompt_attention` tracks them: its round and square stacks
    together, escapes skipped, a closing bracket with none open ignored, unclosed ones counted to the end.
    Linear; the parser's own cost is (items x this depth), so callers bound it first."""
    depth = best = 0
    open_round = open_square = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2 if i + 1 < n and text[i + 1] in "()[]\\" else 1
            continue
        if c == "(":
            open_round += 1
        elif c == "[":
            open_square += 1
        elif c == ")" and open_round:
            open_round -= 1
        elif c == "]" and open_square:
            open_square -= 1
        depth = open_round + open_square
        best = max(best, depth)
        i += 1
    return best


def is_break(segment: Segment) -> bool:
    return segment[0] == "BREAK" and segment[1] == BREAK_WEIGHT
