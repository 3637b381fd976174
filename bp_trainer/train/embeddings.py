"""Tag embeddings trained with the model: which tags, under which name, with how many vectors, from what.

A chosen tag becomes a textual-inversion embedding the WebUI loads by file name, so its name is the text users
type: the tag in space form (`by_amanogawa_kyousuke` -> `by amanogawa kyousuke`; `fuzichoco` stays). In the
training captions the tag's tokens are replaced by the embedding's vectors (`embedding_text`), in either form.

By default an embedding has one vector per CLIP piece of the tag as the captions train it (after the
`dataset.underscores_to_spaces` rule), each started from that piece's own token embedding, so step 0
conditions exactly as the plain caption did. Fewer vectors start from the means of neighbouring pieces
(one vector: the mean of all); `init_text` starts them from another text's tokens instead (more vectors than
tokens repeat them, as the WebUI's "Create embedding" does).

Torch-free: the config check imports it. `tag_embeddings` holds the vectors, `embedding_text` inserts them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from bp_trainer.errors import ConfigError

MAX_VECTORS = 75  # an embedding never spans two 75-token chunks
_NOT_IN_FILE_NAMES = set('/\\:*?"<>|')


def embedding_name(tag: str) -> str:
    """The WebUI name (and file name, without `.safetensors`) of a tag's embedding: its space form."""
    from bp_trainer.dataset.captions import underscores_to_spaces

    return underscores_to_spaces(tag.strip())


def name_problem(tag: str) -> Optional[str]:
    """Why `tag` cannot name an embedding file, or None."""
    name = embedding_name(tag)
    bad = sorted(set(name) & _NOT_IN_FILE_NAMES)
    if not name:
        return "an empty tag cannot be an embedding"
    if bad or name.startswith(".") or any(ord(c) < 32 for c in name):
        shown = " ".join(bad) or "a leading dot or control character"
        return (f"'{tag}' cannot be an embedding's file name ({shown}); rename the tag in the captions "
                "(Tokens tab > Rename a tag) or leave it out")
    if len(name.encode("utf-8")) > 200:
        return f"'{tag[:40]}...' is too long for an embedding's file name (200 bytes at most)"
    return None


def tag_problems(tags: Iterable[str]) -> List[str]:
    """One message per listed tag that cannot be an embedding (config check)."""
    return [p for p in (name_problem(t) for t in tags) if p]


def tag_forms(name: str) -> Tuple[str, ...]:
    """The forms of a tag a caption may hold: space form first, then the `_` form (if different)."""
    under = name.replace(" ", "_")
    return (name,) if under == name else (name, under)


# ------------------------------------------------------------------------------------------------ selection


def _is_flagged(tags: Sequence[str], tokenizer: Any) -> List[bool]:
    """Whether each tag has a word CLIP cuts into meaningless pieces (the audit's flag: bp_trainer.tokens.mangled)."""
    from bp_trainer.tokens.mangled import mangled_by_tag

    found = mangled_by_tag(tags, tokenizer)
    return [bool(found.get(t)) for t in tags]


def count_names(captions: Iterable[str]) -> Tuple["Counter[str]", Dict[str, "Counter[str]"]]:
    """(images per embedding name, the raw forms of each name with their counts). A caption counts once per name."""
    from bp_trainer.dataset.captions import split_tags

    images: Counter[str] = Counter()
    forms: Dict[str, Counter[str]] = {}
    for caption in captions:
        seen = {}
        for tag in split_tags(caption):
            seen.setdefault(embedding_name(tag), tag)
        for name, tag in seen.items():
            images[name] += 1
            forms.setdefault(name, Counter())[tag] += 1
    return images, forms


def auto_tags(captions: Iterable[str], tokenizer: Any, min_images: int) -> List[str]:
    """`embeddings: {auto: {min_images: N}}`: every mangled tag in at least N images (as the captions write it,
    most images first). The one adapter between the run config and the audit's mangled flag."""
    images, forms = count_names(captions)
    frequent = [name for name, n in images.most_common() if n >= min_images]
    tags = [forms[name].most_common(1)[0][0] for name in frequent]
    ok = [name_problem(t) is None for t in tags]
    flags = _is_flagged(tags, tokenizer) if tags else []
    return [t for t, flag, fine in zip(tags, flags, ok) if flag and fine]


# ------------------------------------------------------------------------------------------------ plans


@dataclass(frozen=True)
class TagPlan:
    """One embedding to train: how it is found in captions and how it starts."""

    tag: str  # as listed in the config or found by `auto`
    name: str  # WebUI name = file name (space form)
    train_text: str  # the tag as the training captions write it
    images: int  # images whose caption holds it (any form)
    init_ids: Tuple[int, ...]  # the tokens its vectors start from
    vectors: int
    aliases: Tuple[Tuple[int, ...], ...]  # token id sequences it replaces in a caption (space and `_` forms)

    def to_dict(self) -> Dict[str, Any]:
        return {"tag": self.tag, "name": self.name, "train_text": self.train_text, "images": self.images,
                "vectors": self.vectors}


def init_groups(sources: int, vectors: int) -> List[List[int]]:
    """Which source rows each vector starts from (their mean): one row each when there are as many; neighbouring
    rows split as evenly as possible when there are fewer vectors; rows repeated (`i * sources // vectors`, the
    WebUI's "Create embedding" rule) when there are more."""
    if sources < 1 or vectors < 1:
        raise ValueError("sources and vectors must be positive")
    if vectors >= sources:
        return [[i * sources // vectors] for i in range(vectors)]
    bounds = [round(k * sources / vectors) for k in range(vectors + 1)]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(vectors)]


def _train_text(name: str, forms: "Counter[str] | None", listed: str, spaces: bool) -> str:
    from bp_trainer.dataset.captions import underscores_to_spaces

    raw = forms.most_common(1)[0][0] if forms else listed
    return underscores_to_spaces(raw) if spaces else raw


def plan_embeddings(section: Any, captions: Sequence[str], tokenizer: Any, *, underscores_to_spaces: bool,
                    warn: Optional[Callable[[str], None]] = None) -> List[TagPlan]:
    """The embeddings a run trains (`section`: the config's `embeddings`), in a fixed order: listed tags, then
    `auto` ones. A ConfigError names a tag that cannot be one."""
    from bp_trainer.tokens.tokenizer import TokenizerView

    view = TokenizerView.of(tokenizer)
    chosen = list(section.tags)
    if section.auto is not None:
        chosen += auto_tags(captions, tokenizer, int(section.auto.min_images))
    problems = tag_problems(chosen)
    if problems:
        raise ConfigError("; ".join(problems), path="embeddings.tags")
    images, forms = count_names(captions)
    init_ids = tuple(view.encode(section.init_text)) if section.init_text else None
    if section.init_text and not init_ids:
        raise ConfigError("embeddings.init_text has no tokens", hint="give it some words, or leave it empty")
    plans: List[TagPlan] = []
    for tag in chosen:
        name = embedding_name(tag)
        if any(p.name == name for p in plans):
            continue  # `long_hair` and `long hair` are one embedding
        text = _train_text(name, forms.get(name), tag.strip(), underscores_to_spaces)
        source = init_ids or tuple(view.encode(text))
        vectors = int(section.vectors or len(source))
        if not source or vectors > MAX_VECTORS:
            raise ConfigError(f"'{tag}' would need {vectors} vectors (1-{MAX_VECTORS})", path="embeddings.tags",
                              hint="set embeddings.vectors lower, or shorten the tag")
        if warn is not None and not images.get(name):
            warn(f"embedding '{name}': no caption holds the tag; its vectors stay as initialised")
        aliases = tuple(dict.fromkeys(tuple(view.encode(f)) for f in (*tag_forms(name), tag.strip(), text)))
        plans.append(TagPlan(tag=tag.strip(), name=name, train_text=text, images=int(images.get(name, 0)),
                             init_ids=source, vectors=vectors, aliases=tuple(a for a in aliases if a)))
    return plans
