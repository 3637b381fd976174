"""Prompt parsing against the WebUI v1.10.1: its recorded answers (fixture) and its documented examples."""

from __future__ import annotations

import pytest

from bp_trainer.tokens.attention import parse_prompt_attention
from bp_trainer.tokens.schedules import counter_prompts, prompt_schedule, split_and, strip_extra_networks
from tests.conftest import load_fixture

PROMPTS = load_fixture("a1111-prompts.json")["prompts"]


@pytest.mark.parametrize("case", PROMPTS, ids=lambda c: c["text"][:40])
def test_attention_matches_webui_fixture(case):
    assert parse_prompt_attention(case["text"]) == case["attention"]


# Examples from the WebUI's parse_prompt_attention docstring (its expected outputs, not ours).
@pytest.mark.parametrize("text,expected", [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.1 * 1.1 * 1.3], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.1 ** 4], [".", 1.1]]),
])
def test_attention_webui_doc_examples(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


def test_attention_break_and_empty():
    assert parse_prompt_attention("a BREAK b") == [["a", 1.0], ["BREAK", -1], ["b", 1.0]]
    assert parse_prompt_attention("") == [["", 1.0]]
    # A word that merely contains BREAK is not a break.
    assert parse_prompt_attention("BREAKING news") == [["BREAKING news", 1.0]]
    # Escaped backslash, and a lone backslash before an ordinary character.
    assert parse_prompt_attention("a\\\\b") == [["a\\b", 1.0]]
    assert parse_prompt_attention("[x]") == [["x", 1 / 1.1]]


# Examples from the WebUI's get_learned_conditioning_prompt_schedules docstring (10 steps).
SCHEDULE_DOC = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
    ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
]


@pytest.mark.parametrize("text,expected", SCHEDULE_DOC, ids=[t for t, _ in SCHEDULE_DOC])
def test_schedule_webui_doc_examples(text, expected):
    assert [list(x) for x in prompt_schedule(text, 10)] == expected


def test_schedule_hires_and_old_rules():
    # WebUI docstring: with 10 hires steps a fraction counts in the range 1-2.
    assert [list(x) for x in prompt_schedule("a [b:.5] c", 10, 10)] == [[10, "a b c"]]
    assert [list(x) for x in prompt_schedule("a [b:1.5] c", 10, 10)] == [[5, "a  c"], [10, "a b c"]]
    # Old rules: 0.5 is a fraction, 3 is a step; new rules: "3.0" (has a '.') is a fraction of the steps.
    assert [list(x) for x in prompt_schedule("[a:b:0.5]", 10, use_old_scheduling=True)] == [[5, "a"], [10, "b"]]
    assert [list(x) for x in prompt_schedule("[a:b:3.0]", 10)] == [[10, "a"]]
    assert [list(x) for x in prompt_schedule("[a::4]", 10)] == [[4, "a"], [10, ""]]
    assert [list(x) for x in prompt_schedule("[a:b:12]", 10)] == [[10, "a"]]


def test_and_split_and_extra_networks():
    # The weight regex is lazy: trailing spaces go; leading ones stay, so " a cat" differs from "a cat".
    assert split_and("a cat AND a dog:0.5 AND a cat AND a cat") == [("a cat", 1.0), (" a dog", 0.5), (" a cat", 1.0)]
    assert split_and("ANDROID") == [("ANDROID", 1.0)]
    text, nets = strip_extra_networks("1girl, <lora:my_style:0.8>, smile<hypernet:x:1>")
    assert text == "1girl, , smile"
    assert nets == [{"name": "lora", "args": ["my_style", "0.8"]}, {"name": "hypernet", "args": ["x", "1"]}]
    # Positive prompts split on AND; negative prompts are measured whole.
    assert counter_prompts("a AND b", 20) == ["a", " b"]
    assert counter_prompts("a AND b", 20, negative=True) == ["a AND b"]
    assert counter_prompts("x [y:z:5]", 20) == ["x y", "x z"]


def test_linear_helpers_equal_the_webui_regexes():
    """BREAK splitting, AND weights and extra-network removal are done in linear time (the WebUI's regexes are
    quadratic on long whitespace: 32,000 spaces took a minute); on every string they must give what the WebUI's
    own regexes (modules/prompt_parser.py re_break / re_weight, extra_networks.re_extra_net) give."""
    import random
    import re

    from bp_trainer.tokens.attention import split_breaks
    from bp_trainer.tokens.schedules import and_weight

    re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)
    re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
    re_extra_net = re.compile(r"<(\w+):([^>]+)>")
    rng = random.Random(5)
    alphabet = list("ab:1.2-+ \n\t<>x_") + ["BREAK", " BREAK ", "BREAKx", ":0.5", " : 2", "<lora:x:1>", "\u00a0",
                                             "\u2003", ".5", "3.", "AND"]
    for _ in range(30_000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert split_breaks(text) == re_break.split(text), text
        assert and_weight(text) == re_weight.search(text).groups(), text
        assert strip_extra_networks(text)[0] == re_extra_net.sub("", text), text


def test_split_independent_pieces():
    from bp_trainer.tokens.schedules import split_independent

    assert split_independent("a, (b, c), [d:e:3]") == ["a, ", "(b, c)", ", ", "[d:e:3]"]
    assert split_independent("a[b:c:3]d (e) f") == ["a", "[b:c:3]", "d ", "(e)", " f"]  # no comma needed
    assert split_independent("a \\(, b") == ["a \\(, b"]  # an escaped bracket is text
    assert split_independent("(a, b") == ["(a, b"]  # unbalanced: parsed whole
    assert split_independent("(a], b") == ["(a], b"]  # mismatched types: parsed whole
    # A stray run of brackets and colons (`]:`, `)(`) could cross the cut: such neighbours stay together.
    assert split_independent("x [a:2]:b (c)(d)") == ["x ", "[a:2]:b ", "(c)(d)"]


def _schedule_outcomes(texts: list, steps: int, hash_seeds: range, split: bool) -> list:
    """Per text, every result of `prompt_schedule` (split=False: the WebUI's whole-prompt parse) over Python
    hash seeds.

    lark's Earley parser resolves this grammar's ambiguities in an order that depends on the hash seed, so
    for some prompts (stray brackets next to a schedule: `a[a:2][x:y:3]:a`) the WebUI itself answers
    differently from one start to the next. Each outcome is one the WebUI can give."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, sys; from bp_trainer.tokens.schedules import prompt_schedule; "
            f"print(json.dumps([prompt_schedule(t, {steps}, split={split}) for t in json.load(sys.stdin)]))")
    outcomes: list = [set() for _ in texts]
    for seed in hash_seeds:
        env = dict(os.environ, PYTHONHASHSEED=str(seed))
        done = subprocess.run([sys.executable, "-c", code], input=json.dumps(texts), capture_output=True,
                              text=True, env=env, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        for found, result in zip(outcomes, json.loads(done.stdout)):
            found.add(json.dumps(result))
    return outcomes


def test_piecewise_schedules_equal_whole_prompt_parse():
    """Long prompts are parsed piece by piece (Earley parsing is slow on many brackets); the result must be
    the whole-prompt parse's (the WebUI's way) on every generated prompt, with and without commas, including
    ones that fail to parse. Where the whole parse is ambiguous, the piecewise result must be one of the
    answers the WebUI gives (over fixed hash seeds, so the check itself is deterministic)."""
    import random

    rng = random.Random(3)
    units = list("ab c") + [", "] * 3 + [" "] * 2 + [
        "(", ")", "[", "]", ":", "|", "\\", "\\(", "1.5", "0.3", "4", " BREAK ", "[x:y:3]", "(w:1.2)", "[p|q]",
        "[u::0.5]", "\n", "[a:2]", "((b))", "[[c]]", "[d|]", "(e:f)", ":3]", "-1", ".5", "e3"]
    texts = ["".join(rng.choice(units) for _ in range(rng.randint(0, 16))) for _ in range(400)]
    for steps in (10, 3):
        differ = [t for t in texts if prompt_schedule(t, steps) != prompt_schedule(t, steps, split=False)]
        assert len(differ) < len(texts) // 5  # only the ambiguous few
        whole = _schedule_outcomes(differ, steps, range(12), split=False)
        for text, ours, webui in zip(differ, _schedule_outcomes(differ, steps, range(4), split=True), whole):
            assert ours <= webui, text
