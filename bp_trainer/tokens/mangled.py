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
    split = _split_word(word.lower())
    if split is None:
        return None
    view = TokenizerView.of(tokenizer)
    return _verdict(word, split[0], split[1], view.pieces(view.encode(split[0])))


def mangled_words(tag: str, tokenizer: Any = None) -> list:
    """Every word of `tag` that CLIP cuts into meaningless pieces, in order (empty: the tag reads fine)."""
    return mangled_by_tag([tag], tokenizer)[tag]


def mangled_by_tag(tags: Iterable[str], tokenizer: Any = None) -> dict:
    """{tag: mangled_words(tag)} for many tags: each distinct word judged once, all tokenized in one batch."""
    view = TokenizerView.of(tokenizer)
    tags = list(dict.fromkeys(tags))
    splits = {w: _split_word(w.lower()) for tag in tags for w in tag_words(tag)}
    parts = sorted({split[0] for split in splits.values() if split is not None})
    pieces_of = {part: view.pieces(ids) for part, ids in zip(parts, view.encode_many(parts))}
    verdicts = {w: _verdict(w, split[0], split[1], pieces_of[split[0]]) if split is not None else None
                for w, split in splits.items()}
    return {tag: [verdicts[w] for w in tag_words(tag) if verdicts[w] is not None] for tag in tags}


def _split_word(lower: str) -> Optional[tuple]:
    """(the text to tokenize, whether the word is a letters-and-digits code); None for a number. A number then
    letters (`1girl`) is judged by its letters."""
    if lower.isdigit():
        return None
    m = _NUMBER_THEN_LETTERS.fullmatch(lower)
    return (m.group(1), False) if m else (lower, True)


def _verdict(word: str, part: str, is_code: bool, pieces: list) -> Optional[MangledWord]:
    if is_code:
        return MangledWord(word, _shown(pieces), "letters and digits") if len(pieces) >= 3 else None
    if len(pieces) < 2:
        return None
    if reads_as_kana(part):
        return MangledWord(word, _shown(pieces), "romanized Japanese")
    sizes = sorted(len(p[:-4] if p.endswith("</w>") else p) for p in pieces)
    if len(pieces) >= 4 or (len(pieces) == 3 and sizes[0] == 1 and sizes[1] <= 2):
        return MangledWord(word, _shown(pieces), "fragments")
    return None


def _shown(pieces: list) -> tuple:
    if all(p.isascii() for p in pieces):  # printable ASCII is its own byte-level character
        return tuple(p[:-4] if p.endswith("</w>") else p for p in pieces)
    return tuple(text.strip() for text in readable_pieces(pieces))


__all__ = ["MangledWord", "mangled_words", "mangled_by_tag", "judge_word", "tag_words", "reads_as_kana"]
