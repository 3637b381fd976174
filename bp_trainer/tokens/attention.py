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
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


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
            for i, part in enumerate(_BREAK.split(unit)):
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


def is_break(segment: Segment) -> bool:
    return segment[0] == "BREAK" and segment[1] == BREAK_WEIGHT
