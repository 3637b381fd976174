"""Token counter, chunking and per-tag inspection against the real WebUI's answers and the real CLIP BPE."""

from __future__ import annotations

import pytest

from bp_trainer.tokens import inspect_prompt, token_counter, tokenize_line
from bp_trainer.tokens.chunks import chunk_segments, target_token_count
from bp_trainer.tokens.tokenizer import TokenizerView, find_model_tokenizer, readable_piece, readable_pieces
from tests.conftest import load_fixture

FIX = load_fixture("a1111-prompts.json")


@pytest.mark.parametrize("case", FIX["prompts"], ids=lambda c: c["text"][:40])
def test_counter_and_chunks_match_webui(case, clip_tokenizer):
    assert list(token_counter(case["text"], clip_tokenizer, steps=20)) == case["counter"]
    assert len(tokenize_line(case["text"], clip_tokenizer).chunks) == case["chunks_raw_text"]


@pytest.mark.parametrize("case", FIX["words"], ids=lambda c: c["text"])
def test_word_pieces_match_webui(case, clip_tokenizer):
    view = TokenizerView.of(clip_tokenizer)
    ids = view.encode(case["text"])
    assert ids == case["ids"]
    assert view.pieces(ids) == case["pieces"]
    tags = inspect_prompt(case["text"], clip_tokenizer)["tags"]
    assert [t["pieces"] for t in tags] == [case["pieces"]]


def seg(ids, w=1.0):
    return [(i, w) for i in ids]


def test_chunking_comma_backoff_moves_tail_to_next_chunk():
    # 70 words, a comma (71st token), then 10 words: at 75 tokens the comma is 5 back (<= 20), so the 4
    # words after it move to the next chunk.
    chunks, count = chunk_segments([seg([1] * 70 + [267] + [2] * 10)])
    assert [(c.start, c.end, c.closed_by) for c in chunks] == [(0, 71, "comma"), (71, 81, "end")]
    assert count == 75 + 10
    assert len(chunks[0].ids) == 77 and chunks[0].ids[0] == 49406 and chunks[0].ids[-5:] == [49407] * 5
    # Comma 25 tokens back: too far, the chunk is cut at 75.
    chunks, count = chunk_segments([seg([1] * 50 + [267] + [2] * 30)])
    assert [(c.start, c.end) for c in chunks] == [(0, 75), (75, 81)] and count == 81
    # backtrack 0 disables the rule (WebUI setting "Prompt word wrap length limit" = 0).
    chunks, _ = chunk_segments([seg([1] * 70 + [267] + [2] * 10)], backtrack=0)
    assert [(c.start, c.end) for c in chunks] == [(0, 75), (75, 81)]


def test_chunking_break_empty_and_weights():
    chunks, count = chunk_segments([None, seg([5] * 3, 1.5)])
    assert [(c.start, c.end, c.closed_by) for c in chunks] == [(0, 0, "BREAK"), (0, 3, "end")]
    assert count == 78 and target_token_count(count) == 150
    assert chunks[1].multipliers[:5] == [1.0, 1.5, 1.5, 1.5, 1.0]
    chunks, count = chunk_segments([])
    assert len(chunks) == 1 and count == 0 and target_token_count(0) == 75
    # Exactly 75 tokens: one chunk, count 75.
    chunks, count = chunk_segments([seg([1] * 75)])
    assert len(chunks) == 1 and count == 75 and target_token_count(75) == 75


def test_inspect_prompt_tags_weights_and_chunks(clip_tokenizer):
    r = inspect_prompt("(masterpiece:1.2), ((best quality)), long_hair, <lora:x:0.5> [blurry]", clip_tokenizer)
    assert [t["text"] for t in r["tags"]] == ["masterpiece", "best quality", "long_hair", "blurry"]
    assert [t["weight"] for t in r["tags"]] == pytest.approx([1.2, 1.21, 1.0, 1 / 1.1])
    assert r["tags"][2]["pieces"] == ["long</w>", "_</w>", "hair</w>"]
    assert r["extra_networks"] == [{"name": "lora", "args": ["x", "0.5"]}]
    # Token positions: tags and the comma tokens between them tile the stream.
    assert [(t["start"], t["end"]) for t in r["tags"]] == [(0, 1), (2, 4), (5, 8), (9, 10)]
    assert r["count"] == 10 and r["limit"] == 75 and r["chunks"][0]["tokens"] == 10
    # Chips: one per token, commas belong to no tag, weights as the WebUI's multipliers.
    chips = r["tokens"]
    assert [c["pos"] for c in chips] == list(range(10))
    assert [c["tag"] for c in chips] == [0, None, 1, 1, None, 2, 2, 2, None, 3]
    assert chips[0]["weight"] == pytest.approx(1.2) and chips[0]["text"] == "masterpiece "


def test_inspect_long_prompt_chunk_boundaries(clip_tokenizer):
    text = ", ".join(f"detailed thing{i}" for i in range(30))
    r = inspect_prompt(text, clip_tokenizer)
    assert len(r["chunks"]) >= 2
    first_break = r["chunks"][0]["end"]
    # The comma back-off keeps each tag inside one chunk.
    assert not any(t["crosses_chunk"] for t in r["tags"])
    assert any(t["start"] == first_break for t in r["tags"])
    assert r["count"] == token_counter(text, clip_tokenizer)[0]


def test_inspect_schedules_report_longest_variant(clip_tokenizer):
    r = inspect_prompt("cat, [dog:very long golden retriever puppy:5]", clip_tokenizer, steps=20)
    assert [v["text"] for v in r["variants"]] == ["cat, dog", "cat, very long golden retriever puppy"]
    assert r["text"] == "cat, very long golden retriever puppy"
    assert r["count"] == max(v["count"] for v in r["variants"])


def test_emphasis_none_mode_keeps_brackets(clip_tokenizer):
    plain = tokenize_line("(cat:1.5)", clip_tokenizer, emphasis=False)
    assert plain.parsed == [["(cat:1.5)", 1.0]]
    assert plain.count > tokenize_line("(cat:1.5)", clip_tokenizer).count


def test_odd_punctuation_keeps_ids_exact(clip_tokenizer):
    # ',,' is a single BPE token: the stream must still be the segment's own tokenization.
    line = tokenize_line("foo,, bar, baz", clip_tokenizer)
    view = TokenizerView.of(clip_tokenizer)
    assert line.chunks[0].ids[1:1 + line.count] == view.encode("foo,, bar, baz")
    assert [t["text"] for t in line.tags][-1] == "baz"


def test_readable_piece_and_model_lookup(clip_tokenizer):
    assert readable_piece("hair</w>") == "hair "
    assert readable_piece("cafÃ©</w>") == "café "
    # A character cut over several byte-level pieces shows on each of them, marked with "…".
    view = TokenizerView.of(clip_tokenizer)
    pieces = view.pieces(view.encode("1girl, 初音ミク"))
    texts = readable_pieces(pieces)
    assert texts[:3] == ["1 ", "girl ", ", "]
    glued = [t for t in texts[3:] if t.strip()]
    assert all("…" in t for t in glued)  # every CJK character here spans two or three pieces
    assert set("初音ミク") == {c for t in glued for c in t if c not in "… "}
    r = inspect_prompt("初音ミク", clip_tokenizer)
    assert [c["text"] for c in r["tokens"]] == readable_pieces(r["tags"][0]["pieces"])

    class Wrapped:
        tokenizer = clip_tokenizer

    class Cond:
        wrapped = Wrapped()

    class Model:
        cond_stage_model = Cond()

    assert find_model_tokenizer(Model()) is clip_tokenizer
    assert find_model_tokenizer(object()) is None

    class Conditioner:  # SDXL: a GeneralConditioner without .wrapped; CLIP-L is the first embedder
        embedders = [Wrapped(), object()]

    class XL:
        cond_stage_model = Conditioner()

    assert find_model_tokenizer(XL()) is clip_tokenizer


def test_tags_and_chunks_tile_the_token_stream(clip_tokenizer):
    """Property over generated prompts: each tag's ids are exactly its slice of the WebUI's token stream, and
    the chunks cover that stream in order (so the UI can draw chips and chunk dividers from positions)."""
    import random

    rng = random.Random(7)
    words = ["girl", "sakimichan", "long_hair", "a", "very long descriptive phrase of things", ",", ", ", " BREAK ",
             "(", ")", "[", "]", ":1.3)", "\\(", ",,", "x"]
    for _ in range(60):
        text = "".join(rng.choice(words) + rng.choice([" ", ", ", ""]) for _ in range(rng.randint(0, 90)))
        line = tokenize_line(text, clip_tokenizer)
        stream = [t for c in line.chunks for t in c.ids[1:1 + c.count]]
        assert [(c.start, c.end) for c in line.chunks] == list(zip(
            [0] + [c.end for c in line.chunks[:-1]], [c.end for c in line.chunks]))
        for tag in line.tags:
            assert stream[tag["start"]:tag["end"]] == tag["ids"]
        covered = sorted(p for tag in line.tags for p in range(tag["start"], tag["end"]))
        assert len(covered) == len(set(covered))


def test_textual_inversion_embeddings_count_as_their_vectors(clip_tokenizer):
    from bp_trainer.tokens.chunks import EmbeddingUse

    # An embedding that does not fit in the current chunk moves whole to the next one.
    chunks, count = chunk_segments([seg([1] * 70) + [(EmbeddingUse("e", 8, 5), 1.2)]])
    assert [(c.start, c.end, c.closed_by) for c in chunks] == [(0, 70, "embedding"), (70, 78, "end")]
    assert count == 75 + 8 and chunks[1].ids[1:9] == [0] * 8 and chunks[1].multipliers[1:9] == [1.2] * 8

    embeddings = {"EasyNegative": 8}
    r = inspect_prompt("lowres, (EasyNegative:1.1)", clip_tokenizer, negative=True, embeddings=embeddings)
    lowres = len(TokenizerView.of(clip_tokenizer).encode("lowres"))
    assert r["count"] == lowres + 1 + 8
    neg = r["tags"][1]
    assert neg["text"] == "EasyNegative" and neg["ids"] == [0] * 8 and neg["embeddings"] == ["EasyNegative"]
    assert neg["weight"] == pytest.approx(1.1) and neg["pieces"] == ["<EasyNegative>"] * 8
    assert [c["tag"] for c in r["tokens"]] == [0] * lowres + [None] + [1] * 8
    # Without the embedding database the name is plain text.
    assert token_counter("lowres, EasyNegative", clip_tokenizer)[0] == lowres + 1 + len(
        TokenizerView.of(clip_tokenizer).encode("EasyNegative"))


def test_the_tokenizer_cache_is_bounded(clip_tokenizer, monkeypatch):
    """A long-lived process (the WebUI) caches ids per distinct text: the cache is emptied when it would pass
    its bound, and answers stay right across the clearing."""
    from bp_trainer.tokens import tokenizer as tk

    monkeypatch.setattr(tk, "MAX_CACHED_TEXTS", 5)
    view = TokenizerView(clip_tokenizer)
    first = view.encode_many(["1girl", "solo", "smile"])
    assert view.encode_many(["1girl", "long hair", "blue eyes", "red eyes"]) == [
        first[0], *(clip_tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("long hair", "blue eyes", "red eyes"))]
    assert len(view._ids) <= 5
