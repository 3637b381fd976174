"""Dataset tag audit, replacement suggestions, and the `tokens` CLI contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bp_trainer.cli import main
from bp_trainer.errors import BPError
from bp_trainer.tokens.audit import audit_dataset, read_focus_file
from bp_trainer.tokens.suggest import BYTE_TOKENS, suggest_replacements
from bp_trainer.tokens.tokenizer import TokenizerView

CAPTIONS = {
    "1.txt": "1girl, sakimichan, long_hair, smile",
    "2.txt": "1girl, hatsune miku, smile, smile",
    "3.txt": "1boy, greg rutkowski, sakimichan",
    "sub/4.txt": "1girl, wlop",
}


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    for rel, text in CAPTIONS.items():
        cap = root / rel
        cap.parent.mkdir(parents=True, exist_ok=True)
        cap.write_text(text, encoding="utf-8")
        cap.with_suffix(".jpg").write_bytes(b"x")
    (root / "orphan.txt").write_text("orphan_tag", encoding="utf-8")  # no image: not a caption
    return root


def test_audit_counts_pieces_and_flags(dataset, clip_tokenizer):
    r = audit_dataset(dataset, clip_tokenizer)
    rows = {x["tag"]: x for x in r["tags"]}
    assert r["captions"] == 4 and r["distinct_tags"] == 8 and "orphan_tag" not in rows
    # Frequency = captions containing the tag (a repeat within one caption counts once).
    assert rows["1girl"]["count"] == 3 and rows["smile"]["count"] == 2 and rows["sakimichan"]["count"] == 2
    # Pieces as the real WebUI's tokenizer gives them (fixture words).
    assert rows["sakimichan"]["pieces"] == ["sa", "kim", "ic", "han</w>"] and rows["sakimichan"]["flagged"]
    assert rows["sakimichan"]["mangled"][0]["shown"] == "sakimichan \u2192 sa·kim·ic·han"
    # 3 pieces, but of words CLIP knows: not flagged (the piece count stays a column).
    assert rows["long_hair"]["pieces"] == ["long</w>", "_</w>", "hair</w>"] and not rows["long_hair"]["flagged"]
    assert rows["wlop"]["n_pieces"] == 2 and not rows["wlop"]["flagged"]
    assert r["flagged"] == sum(x["flagged"] for x in r["tags"]) == 2  # sakimichan, hatsune miku (hat·sune)
    assert [x["tag"] for x in r["tags"]][:1] == ["1girl"]  # default sort: most frequent first

    by_pieces = audit_dataset(dataset, clip_tokenizer, sort="pieces")["tags"]
    assert [x["n_pieces"] for x in by_pieces] == sorted((x["n_pieces"] for x in by_pieces), reverse=True)
    flagged = audit_dataset(dataset, clip_tokenizer, flagged_only=True)["tags"]
    assert sorted(x["tag"] for x in flagged) == ["hatsune miku", "sakimichan"]
    spaced = {x["tag"]: x for x in audit_dataset(dataset, clip_tokenizer, spaces=True)["tags"]}
    assert spaced["long_hair"]["pieces"] == ["long</w>", "hair</w>"] and spaced["long_hair"]["trained_as"] == "long hair"


def test_audit_focus_file_and_pattern(dataset, clip_tokenizer, tmp_path):
    focus = tmp_path / "artists.txt"
    focus.write_text("# artists\nsakimichan\nwlop, nobody_here\n\n", encoding="utf-8")
    assert read_focus_file(focus) == ["sakimichan", "wlop", "nobody_here"]
    r = audit_dataset(dataset, clip_tokenizer, focus=read_focus_file(focus))
    assert sorted(x["tag"] for x in r["tags"]) == ["sakimichan", "wlop"]
    assert r["focus_missing"] == ["nobody_here"]
    r = audit_dataset(dataset, clip_tokenizer, pattern=r"^\d")
    assert sorted(x["tag"] for x in r["tags"]) == ["1boy", "1girl"]
    with pytest.raises(BPError, match="regular expression"):
        audit_dataset(dataset, clip_tokenizer, pattern="(")
    with pytest.raises(BPError, match="does not exist"):
        audit_dataset(dataset / "missing", clip_tokenizer)


def test_suggestions_are_single_rare_unused_tokens(dataset, clip_tokenizer):
    view = TokenizerView.of(clip_tokenizer)
    r = suggest_replacements(dataset, "sakimichan", clip_tokenizer, count=5)
    assert r["tag_pieces"] == ["sa", "kim", "ic", "han</w>"] and r["tag_count"] == 2
    assert len(r["suggestions"]) == 5
    used = {i for text in CAPTIONS.values() for t in text.split(",") for i in view.encode(t.strip())}
    n_merges = len(view.vocab) - BYTE_TOKENS - 2
    for s in r["suggestions"]:
        word = s["text"]
        assert view.encode(word) == [s["id"]]
        assert view.encode(word + ",") == [s["id"], view.comma_id]
        assert view.encode(f"1girl, {word}, smile")[3:5] == [s["id"], view.comma_id]
        assert s["id"] not in used
        assert not any(word in text.lower() for text in CAPTIONS.values())
        assert s["id"] - BYTE_TOKENS >= n_merges // 2  # in the later half of the merges
        assert len(s["reasons"]) >= 3 and "one CLIP token" in s["reasons"][0]

    # A word that appears in a caption is never suggested.
    top = r["suggestions"][0]["text"]
    (dataset / "3.txt").write_text(f"1boy, {top} style", encoding="utf-8")
    again = suggest_replacements(dataset, "sakimichan", clip_tokenizer, count=5)
    assert top not in [s["text"] for s in again["suggestions"]]


def test_cli_tokens_prompt_json_contract(capsys):
    case = next(c for c in json.loads((Path(__file__).parent / "fixtures" / "a1111-prompts.json").read_text())["prompts"]
                if "BREAK" in c["text"])
    assert main(["tokens", case["text"], "--steps", "20", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [r["count"], r["limit"]] == case["counter"]
    assert len(r["chunks"]) == case["chunks_raw_text"]
    assert all({"text", "weight", "pieces", "ids"} <= set(t) for t in r["tags"])
    assert main(["tokens", "(masterpiece:1.2), 8k", "--negative"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("4/75 tokens (negative prompt") and "masterpiece" in out


def test_cli_tokens_dataset(dataset, tmp_path, capsys):
    focus = tmp_path / "f.txt"
    focus.write_text("wlop\n", encoding="utf-8")
    assert main(["tokens", "--dataset", str(dataset), "--focus", str(focus), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [x["tag"] for x in r["tags"]] == ["wlop"] and r["tags"][0]["pieces"] == ["w", "lop</w>"]
    assert main(["tokens", "--dataset", str(dataset), "--pattern", "sak", "--sort", "pieces"]) == 0
    assert "sa|kim|ic|han" in capsys.readouterr().out
    assert main(["tags", "suggest", "--dataset", str(dataset), "--tag", "wlop", "--count", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["suggestions"]) == 2
    assert main(["tokens", "x", "--dataset", str(dataset)]) == 2
