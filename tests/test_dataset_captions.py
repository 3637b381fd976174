"""Caption processing (shuffle, keep, dropout, underscores, escaping) and 3x75-token chunks."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from bp_trainer.dataset.captions import (
    CaptionProcessor,
    chunk_token_ids,
    escape_brackets,
    pad_chunks,
    split_tags,
    tokenize_caption,
    unescape_brackets,
    underscores_to_spaces,
)
from bp_trainer.errors import ConfigError

CAPTION = "1girl, solo, long_hair, ganyu_(genshin_impact), ^_^, blue_sky, smile, [sketch], by_hoshizora_mitsuki"
TAGS = split_tags(CAPTION)


def test_split_tags_strips_and_drops_empties():
    assert split_tags(" a ,b,, c ,") == ["a", "b", "c"]
    assert split_tags("a, b\nc,\r\nd") == ["a", "b", "c", "d"]  # line breaks separate tags too


def test_keep_first_and_shuffle_is_a_permutation():
    proc = CaptionProcessor(shuffle=True, keep_first=2)
    seen = set()
    for seed in range(30):
        out = proc.process(CAPTION, random.Random(seed)).split(", ")
        assert out[:2] == ["1girl", "solo"]
        assert sorted(out) == sorted(TAGS)
        seen.add(tuple(out))
    assert len(seen) > 20


@pytest.mark.parametrize("make_rng", [lambda s: random.Random(s), lambda s: np.random.default_rng(s)])
def test_same_seed_same_caption(make_rng):
    proc = CaptionProcessor(shuffle=True, keep_first=1, tag_dropout=0.3, caption_dropout=0.1,
                            underscores_to_spaces=True)
    a = [proc.process(CAPTION, make_rng(s)) for s in range(20)]
    b = [proc.process(CAPTION, make_rng(s)) for s in range(20)]
    assert a == b and len(set(a)) > 5


def test_tag_dropout_drops_each_tag_at_its_rate():
    proc = CaptionProcessor(keep_first=1, tag_dropout=0.25)
    rng = random.Random(0)
    kept = Counter()
    n = 4000
    for _ in range(n):
        kept.update(proc.process(CAPTION, rng).split(", "))
    assert kept["1girl"] == n  # kept tags are never dropped
    for tag in TAGS[1:]:
        assert abs(kept[tag] / n - 0.75) < 0.04, tag
    assert CaptionProcessor(keep_first=2, tag_dropout=1.0).process(CAPTION, rng) == "1girl, solo"


def test_caption_dropout_gives_empty_captions_at_its_rate():
    proc = CaptionProcessor(caption_dropout=0.1)
    rng = random.Random(1)
    empties = sum(proc.process(CAPTION, rng) == "" for _ in range(4000))
    assert abs(empties / 4000 - 0.1) < 0.02
    assert CaptionProcessor(caption_dropout=1.0).process(CAPTION, rng) == ""


def test_deterministic_processor_needs_no_rng_and_random_one_does():
    assert CaptionProcessor().process(" a, b ,c") == "a, b, c"
    with pytest.raises(ValueError, match="rng"):
        CaptionProcessor(shuffle=True).process(CAPTION)


def test_underscores_to_spaces_keeps_kaomoji():
    assert underscores_to_spaces("long_hair") == "long hair"
    for face in ("^_^", "o_o", ">_<", "0_0", "x_x"):
        assert underscores_to_spaces(face) == face
    out = CaptionProcessor(underscores_to_spaces=True).process(CAPTION)
    assert "long hair" in out and "^_^" in out and "ganyu (genshin impact)" in out


def test_escaped_captions_parse_back_to_the_plain_text_in_the_webui_parser():
    from bp_trainer.tokens.attention import parse_prompt_attention  # WebUI-exact emphasis parser

    plain = CaptionProcessor(underscores_to_spaces=True).process(CAPTION)
    escaped = CaptionProcessor(underscores_to_spaces=True, escape_brackets=True).process(CAPTION)
    assert "ganyu \\(genshin impact\\)" in escaped and "\\[sketch\\]" in escaped
    # the WebUI reads the escaped caption as exactly the plain text, at weight 1 (no emphasis)
    assert parse_prompt_attention(escaped) == [[plain, 1.0]]
    assert parse_prompt_attention(plain) != [[plain, 1.0]]
    assert escape_brackets(escaped) == escaped  # already escaped brackets are not escaped twice
    assert unescape_brackets(escaped) == plain


@pytest.mark.parametrize("kw", [{"tag_dropout": 1.5}, {"caption_dropout": -0.1}, {"keep_first": -1}, {"separator": ""}])
def test_invalid_processor_settings(kw):
    with pytest.raises(ConfigError):
        CaptionProcessor(**kw)


BOS, EOS, PAD = 49406, 49407, 49407


def test_chunks_are_bos_75_eos_padded_and_capped_at_225():
    for n, expect_chunks in [(0, 1), (1, 1), (75, 1), (76, 2), (150, 2), (151, 3), (225, 3), (400, 3)]:
        ids = list(range(1000, 1000 + n))
        chunks = chunk_token_ids(ids, BOS, EOS, PAD)
        assert len(chunks) == expect_chunks, n
        body = []
        for c in chunks:
            assert len(c) == 77 and c[0] == BOS
            inner = c[1:]
            end = inner.index(EOS)
            body += inner[:end]
            assert all(t == PAD for t in inner[end + 1:])
        assert body == ids[:225]


def test_chunk_comma_backtrack_moves_the_cut_tag_to_the_next_chunk():
    comma = 267
    ids = [4999]  # one lone token first, so the cut at 75 falls inside a tag
    while len(ids) < 100:
        ids += [5000 + len(ids), 5001 + len(ids), 5002 + len(ids), comma]  # three-token tags and commas
    plain = chunk_token_ids(ids, BOS, EOS, PAD)
    wrapped = chunk_token_ids(ids, BOS, EOS, PAD, comma=comma, backtrack=20)
    first = wrapped[0][1:wrapped[0].index(EOS, 1)]
    assert first[-1] == comma and len(first) == 73  # commas at 4, 8 ... 72: the tag cut at 75 moved on whole
    second = wrapped[1][1:wrapped[1].index(EOS, 1)]
    assert first + second == ids
    assert plain[0][1:76] == ids[:75]


def test_comma_backtrack_matches_the_webui_counter_exactly():
    from bp_trainer.tokens.chunks import chunk_segments  # WebUI v1.10.1-exact chunking (tokens area)

    comma = 267
    rng = random.Random(11)
    for trial in range(300):
        ids = [comma if rng.random() < rng.choice((0.05, 0.2, 0.4)) else rng.randrange(300, 40000)
               for _ in range(rng.randrange(60, 240))]
        backtrack = rng.choice((1, 5, 20, 40))
        webui, _ = chunk_segments([[(t, 1.0) for t in ids]], backtrack=backtrack, comma_id=comma)
        mine = chunk_token_ids(ids, BOS, EOS, EOS, max_chunks=99, comma=comma, backtrack=backtrack)
        assert mine == [c.ids for c in webui], (trial, backtrack)


def test_pad_chunks_adds_empty_chunks():
    chunks = chunk_token_ids([1, 2], BOS, EOS, PAD)
    padded = pad_chunks(chunks, 3, BOS, EOS, PAD)
    assert len(padded) == 3 and padded[0] == chunks[0] and padded[2] == [BOS, EOS] + [PAD] * 75


def test_tokenize_caption_with_the_real_clip_tokenizer(clip_tokenizer):
    long = ", ".join(["by_hoshizora_mitsuki", "long_hair"] * 40)
    chunks = tokenize_caption(long, clip_tokenizer)
    ids = clip_tokenizer(long, add_special_tokens=False).input_ids
    assert len(ids) > 225 and len(chunks) == 3
    assert [t for c in chunks for t in c[1:76]] == ids[:225]
    assert chunks[0][0] == clip_tokenizer.bos_token_id and chunks[0][76] == clip_tokenizer.eos_token_id
