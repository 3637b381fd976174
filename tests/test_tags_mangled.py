"""The "mangled" flag: a tag is flagged for a word CLIP cuts into meaningless pieces, not for its piece count.

Truth: hand-written lists of real Danbooru tags (common English multi-word tags that must not be flagged,
romanized Japanese artist names that must be) and the real CLIP ViT-L/14 BPE (`bp_trainer.clip_vocab`)."""

from __future__ import annotations

import json

import pytest

from bp_trainer.cli import main
from bp_trainer.tokens.mangled import judge_word, mangled_words, reads_as_kana

# Common multi-word (and Ngirl(s)) Danbooru tags, all words CLIP knows: none may be flagged.
COMMON = [
    "multiple_girls", "simple_background", "long_hair", "1girl", "2girls", "looking_at_viewer", "short_hair",
    "blue_eyes", "white_background", "brown_hair", "black_hair", "red_eyes", "blonde_hair", "hair_ornament",
    "open_mouth", "large_breasts", "long_sleeves", "closed_mouth", "hair_between_eyes", "very_long_hair",
    "bare_shoulders", "purple_eyes", "animal_ears", "closed_eyes", "upper_body", "green_eyes", "school_uniform",
    "full_body", "white_shirt", "pleated_skirt", "hair_ribbon", "short_sleeves", "cowboy_shot", "grey_hair",
    "parted_lips", "detached_sleeves", "off_shoulder", "holding_weapon", "nail_polish", "fingerless_gloves",
    "one_eye_closed", "from_behind", "side_ponytail", "frilled_dress", "puffy_sleeves", "twin_braids",
    "black_thighhighs", "virtual_youtuber", "1boy", "6+girls", "3girls", "heart-shaped_pupils", "star_(symbol)",
    "see-through", "crossed_arms", "hand_on_hip", "streaked_hair", "two-tone_hair", "light_smile", "head_tilt",
]
# Romanized Japanese artist (and character) names: each must be flagged, naming a word it cuts.
ARTISTS = {
    "kishimoto_masashi": "kishimoto", "toriyama_akira": "toriyama", "oda_eiichirou": "eiichirou",
    "takahashi_rumiko": "takahashi", "araki_hirohiko": "hirohiko", "miyazaki_hayao": "miyazaki",
    "shinkai_makoto": "makoto", "hoshino_katsura": "hoshino", "yoshitomi_akihito": "yoshitomi",
    "hirano_katsuyuki": "katsuyuki", "ootsuka_mahiro": "ootsuka", "hatsune_miku": "hatsune",
}


def shown(tag, tokenizer):
    return [str(m) for m in mangled_words(tag, tokenizer)]


def test_the_brief_examples(clip_tokenizer):
    assert shown("fuzichoco", clip_tokenizer) == ["fuzichoco \u2192 fu·z·ic·hoco"]
    assert shown("as109", clip_tokenizer) == ["as109 \u2192 as·1·0·9"]
    assert shown("by_amanogawa_kyousuke", clip_tokenizer) == ["amanogawa \u2192 am·ano·g·awa",
                                                              "kyousuke \u2192 k·you·suke"]
    for tag in ("multiple_girls", "simple_background", "long_hair", "1girl", "2girls", "looking_at_viewer"):
        assert shown(tag, clip_tokenizer) == [], tag


@pytest.mark.parametrize("tag", COMMON)
def test_common_multi_word_tags_are_not_flagged(tag, clip_tokenizer):
    assert shown(tag, clip_tokenizer) == []


@pytest.mark.parametrize("tag,word", ARTISTS.items())
def test_romanized_japanese_names_are_flagged(tag, word, clip_tokenizer):
    found = mangled_words(tag, clip_tokenizer)
    assert word in [m.word for m in found]
    cut = next(m for m in found if m.word == word)
    assert len(cut.pieces) >= 2 and "".join(cut.pieces) == word  # the pieces spell the word, as CLIP cuts it


def test_the_rule_judges_words_not_piece_counts(clip_tokenizer):
    # Many pieces, all known words: fine. Few pieces of a name: flagged.
    assert len(clip_tokenizer("looking_at_viewer", add_special_tokens=False)["input_ids"]) == 5
    assert judge_word("makoto", clip_tokenizer).pieces == ("ma", "koto")
    # English compounds and inflections cut into a few real pieces stay unflagged.
    for word in ("thighhighs", "collarbone", "frills", "heterochromia", "armpits", "miniskirt", "turtleneck"):
        assert judge_word(word, clip_tokenizer) is None, word
    # Non-Japanese names cut into fragments (a single letter among short pieces) are flagged.
    assert str(judge_word("krenz", clip_tokenizer)) == "krenz \u2192 k·ren·z"
    assert judge_word("kyousuke", clip_tokenizer).reason == "romanized Japanese"
    assert judge_word("2020", clip_tokenizer) is None  # a number is read digit by digit, as CLIP reads numbers


def test_reads_as_kana():
    for word in ("amanogawa", "kyousuke", "tsubasa", "hoshizora", "shinkai", "zettai", "issho", "matcha", "shimbun"):
        assert reads_as_kana(word), word
    for word in ("fuzichoco", "thigh", "wlop", "heterochromia", "weapon", "meditation", "nature", "krenz"):
        assert not reads_as_kana(word), word


def test_demo_dataset_audit_flags_only_the_artist_names(tmp_path, clip_tokenizer, capsys):
    from bp_trainer.dataset.demo import ARTISTS as DEMO_ARTISTS
    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer.tokens.audit import audit_dataset

    write_demo_dataset(tmp_path / "demo", count=48, seed=0)
    report = audit_dataset(tmp_path / "demo", clip_tokenizer)
    rows = {r["tag"]: r for r in report["tags"]}
    flagged = {t for t, r in rows.items() if r["flagged"]}
    assert flagged == set(DEMO_ARTISTS) & set(rows) and len(flagged) == 4
    assert {"multiple_girls", "simple_background", "1girl", "2girls", "3girls"} <= set(rows) - flagged
    assert all(r["n_pieces"] >= 3 for r in rows.values() if r["tag"].endswith("_background"))  # counted, not flagged
    assert [m["shown"] for m in rows["by_amanogawa_kyousuke"]["mangled"]] == ["amanogawa \u2192 am·ano·g·awa",
                                                                             "kyousuke \u2192 k·you·suke"]
    # The CLI's --flagged lists the same tags and shows the words cut.
    assert main(["tokens", "--dataset", str(tmp_path / "demo"), "--flagged", "--json"]) == 0
    assert {r["tag"] for r in json.loads(capsys.readouterr().out)["tags"]} == flagged
    assert main(["tokens", "--dataset", str(tmp_path / "demo"), "--flagged"]) == 0
    out = capsys.readouterr().out
    assert "! kyousuke \u2192 k·you·suke" in out and "4 of 51 shown tags flagged" in out


def test_prompt_inspection_and_suggestions_use_the_rule(tmp_path, clip_tokenizer, capsys):
    from bp_trainer.tokens import inspect_prompt
    from bp_trainer.tokens.suggest import suggest_for_counts

    tags = inspect_prompt("by_amanogawa_kyousuke, (long_hair:1.2), multiple_girls", clip_tokenizer)["tags"]
    assert [[m["word"] for m in t["mangled"]] for t in tags] == [["amanogawa", "kyousuke"], [], []]
    assert suggest_for_counts("as109", ["1girl, as109"], clip_tokenizer, count=1)["mangled"][0]["shown"] == \
        "as109 \u2192 as·1·0·9"
    assert suggest_for_counts("long_hair", ["long_hair"], clip_tokenizer, count=1)["mangled"] == []
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text("1girl, by_amanogawa_kyousuke", encoding="utf-8")
    (data / "a.png").write_bytes(b"x")
    assert main(["tags", "suggest", "--dataset", str(data), "--tag", "by_amanogawa_kyousuke", "--count", "1"]) == 0
    assert "CLIP cuts amanogawa \u2192 am·ano·g·awa; kyousuke \u2192 k·you·suke" in capsys.readouterr().out
