"""Which words of a tag CLIP cuts into meaningless fragments: the "mangled" flag of the tag audit.

A tag is judged word by word: words are the runs of letters and digits (`_`, spaces, brackets and other
punctuation separate them), and each word is tokenized alone, as CLIP reads it. A word is mangled when:
- its letters are one CLIP token: never (`girls`, `background`, `viewer`);
- it is a number, or a number then letters (`1girl`, `2girls`, `3d`): the letters are judged alone (CLIP
  reads every digit as its own token, so the digits say nothing);
- its letters read as romanized Japanese (a sequence of Hepburn kana syllables, `amanogawa` = a·ma·no·ga·wa)
  and CLIP cuts them into 2+ pieces: CLIP learned such words only as the syllables' unrelated meanings
  (`am·ano·g·awa`, `k·you·suke`);
- otherwise it is cut into 4+ pieces, or into 3 pieces two of which are at most 2 letters, one of them a
  single letter (`fuzichoco` = fu·z·ic·hoco, `krenz` = k·ren·z): fragments; English compounds and inflections
  split into two or three longer pieces (`thigh·highs`, `collar·bone`, `fr·ills`, `hetero·chro·mia`,
  `ar·mp·its`, `minis·kir·t`) are kept;
- letters then digits (a code, `as109` = as·1·0·9): when cut into 3+ pieces.
Pure: the only outside input is the tokenizer. `mangled_words(tag, tokenizer)` is the entry point (the audit,
the Tokens tab, `tags suggest`, the CLI and the trainer's `embeddings: auto` use it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from bp_trainer.tokens.tokenizer import TokenizerView, readable_pieces

_WORD = re.compile(r"[^\W_]+")  # letters and digits
_NUMBER_THEN_LETTERS = re.compile(r"\d*([^\W\d_]+)")
_VOWEL = "aiueoāīūēōâîûêô"
# One kana syllable in Hepburn romanization (the spelling of Danbooru's romanized names): consonant + vowel
# with the gaps Hepburn has (no si/ti/tu/hu/zi/di/du/wi/we/yi/ye), y-glides, shi/chi/tsu/fu/ji, syllabic n
# (and m before b/p), a doubled consonant (sokuon: kk, ss, tt, pp, tch, ssh) and long vowels as vowel pairs.
_MORA = "|".join([
    f"[{_VOWEL}]",
    f"[kgnbpmr][{_VOWEL}]", f"h[aieoāīēō]", "[kgnhbpmr]y[auoāūō]",
    f"[sz][aueoāūēō]", f"[td][aeoāēō]", f"(?:sh|ch|j)[{_VOWEL}]", "ts[uū]", "f[uū]", "y[auoāūō]", "w[aoāō]",
    f"n(?![{_VOWEL}y])", "m(?=[bp])", "([kstp])(?=\\1)", "t(?=ch)", "s(?=sh)",
])
_KANA_WORD = re.compile(f"(?:{_MORA})+")


@dataclass(frozen=True)
class MangledWord:
    """A word of a tag that CLIP cuts into meaningless pieces."""

    word: str
    pieces: tuple  # CLIP's pieces as display text (`k`, `you`, `suke`)
    reason: str  # "romanized Japanese", "fragments" or "letters and digits"

    def __str__(self) -> str:
        return f"{self.word} \u2192 {'·'.join(self.pieces)}"

    def to_dict(self) -> dict:
        return {"word": self.word, "pieces": list(self.pieces), "reason": self.reason, "shown": str(self)}


def tag_words(tag: str) -> list:
    """The words of a tag, in order, each once: runs of letters and digits."""
    return list(dict.fromkeys(_WORD.findall(tag)))


def reads_as_kana(letters: str) -> bool:
    """Whether lower-case letters spell a sequence of Hepburn kana syllables (`kyousuke`, `amanogawa`)."""
    return _KANA_WORD.fullmatch(letters) is not None


def judge_word(word: str, tokenizer: Any = None) -> Optional[MangledWord]:
    """The verdict on one word (see the module doc): a MangledWord, or None when CLIP reads it fine."""
    view = TokenizerView.of(tokenizer)
    lower = word.lower()
    if lower.isdigit():
        return None
    m = _NUMBER_THEN_LETTERS.fullmatch(lower)
    if m is None:  # letters then digits, or mixed: a code
        pieces = view.pieces(view.encode(lower))
        return MangledWord(word, _shown(pieces), "letters and digits") if len(pieces) >= 3 else None
    letters = m.group(1)
    pieces = view.pieces(view.encode(letters))
    if len(pieces) < 2:
        return None
    if reads_as_kana(letters):
        return MangledWord(word, _shown(pieces), "romanized Japanese")
    sizes = sorted(len(p[:-4] if p.endswith("</w>") else p) for p in pieces)
    if len(pieces) >= 4 or (len(pieces) == 3 and sizes[0] == 1 and sizes[1] <= 2):
        return MangledWord(word, _shown(pieces), "fragments")
    return None


def mangled_words(tag: str, tokenizer: Any = None) -> list:
    """Every word of `tag` that CLIP cuts into meaningless pieces, in order (empty: the tag reads fine)."""
    view = TokenizerView.of(tokenizer)
    return [m for m in (judge_word(w, view) for w in tag_words(tag)) if m is not None]


def mangled_by_tag(tags: Iterable[str], tokenizer: Any = None) -> dict:
    """{tag: mangled_words(tag)} for many tags, their words tokenized in one batch."""
    view = TokenizerView.of(tokenizer)
    tags = list(dict.fromkeys(tags))
    words = {w.lower() for tag in tags for w in tag_words(tag)}
    view.encode_many(sorted(_tokenized_part(w) for w in words))  # fills the view's cache
    return {tag: mangled_words(tag, view) for tag in tags}


def _tokenized_part(lower: str) -> str:
    """The part of a word `judge_word` tokenizes: the letters after a leading number, else the word."""
    m = _NUMBER_THEN_LETTERS.fullmatch(lower)
    return m.group(1) if m else lower


def _shown(pieces: list) -> tuple:
    return tuple(text.strip() for text in readable_pieces(pieces))


__all__ = ["MangledWord", "mangled_words", "mangled_by_tag", "judge_word", "tag_words", "reads_as_kana"]
