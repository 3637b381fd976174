"""The real CLIP ViT-L/14 BPE vocabulary, offline.

The vocabulary ships as `bpe_simple_vocab_16e6.txt.gz` inside the `open_clip_torch` wheel (installed with
`--no-deps`). Importing `open_clip` would pull torchvision, so the file is located through the package's
import spec without importing it. `vocab.json`/`merges.txt` are then built the way OpenAI's SimpleTokenizer
builds its encoder, which is exactly the HF `openai/clip-vit-large-patch14` tokenizer (49408 entries,
bos 49406, eos/pad 49407), and loaded with transformers' `CLIPTokenizer`.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
from pathlib import Path

from bp_trainer.errors import BPError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
_ENV = "BP_TRAIN_CLIP_BPE"  # explicit path override


def _candidate_dirs() -> list[Path]:
    dirs: list[Path] = []
    for pkg in ("open_clip", "clip"):
        try:
            spec = importlib.util.find_spec(pkg)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            dirs.extend(Path(p) for p in spec.submodule_search_locations)
    return dirs


def find_bpe_file() -> Path:
    """Path of the CLIP BPE merges file, without importing open_clip."""
    env = os.environ.get(_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise BPError("the CLIP BPE file named by $BP_TRAIN_CLIP_BPE does not exist", path=path)
        return path
    for d in _candidate_dirs():
        path = d / BPE_FILE
        if path.is_file():
            return path
    raise BPError(
        f"the CLIP vocabulary ({BPE_FILE}) was not found",
        hint="install it with `pip install --no-deps open_clip_torch==2.20.0`, or set $BP_TRAIN_CLIP_BPE to the file",
    )


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode map (same as GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


@functools.lru_cache(maxsize=2)
def load_vocab_and_merges(bpe_path: str | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in priority order), as SimpleTokenizer builds them."""
    path = Path(bpe_path) if bpe_path else find_bpe_file()
    try:
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise BPError(f"cannot read the CLIP BPE file: {exc}", path=path) from exc
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    units = list(bytes_to_unicode().values())
    vocab_list = units + [u + "</w>" for u in units] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab_list) != VOCAB_SIZE:
        raise BPError(f"unexpected CLIP vocabulary size {len(vocab_list)} (expected {VOCAB_SIZE})", path=path)
    return {tok: i for i, tok in enumerate(vocab_list)}, merges  # type: ignore[return-value]


def write_vocab_files(out_dir: "str | os.PathLike[str]") -> Path:
    """Write only vocab.json and merges.txt (what transformers 4.x's CLIPTokenizer reads) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = load_vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return out


def write_tokenizer_files(out_dir: "str | os.PathLike[str]") -> Path:
    """Write vocab.json, merges.txt and the config files of the CLIP ViT-L/14 tokenizer into `out_dir`.

    transformers 4.30 (the WebUI's) and transformers 5 both load this folder with `CLIPTokenizer`.
    """
    out = write_vocab_files(out_dir)
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = dict(special, model_max_length=77, do_lower_case=True, errors="replace",
                  tokenizer_class="CLIPTokenizer", add_prefix_space=False, clean_up_tokenization_spaces=False)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


@functools.lru_cache(maxsize=1)
def _tokenizer_dir() -> str:
    import tempfile

    root = Path(tempfile.gettempdir()) / f"bp_train_clip_tokenizer_{os.getuid() if hasattr(os, 'getuid') else 0}"
    if not (root / "merges.txt").is_file():
        tmp = Path(tempfile.mkdtemp(prefix="bp_train_tok_"))
        write_tokenizer_files(tmp)
        try:
            os.replace(tmp, root)
        except OSError:  # another process won the race, or root exists: use it
            pass
    return str(root if (root / "merges.txt").is_file() else tmp)


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """The CLIP ViT-L/14 tokenizer (transformers `CLIPTokenizer`) built from the offline vocabulary."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(_tokenizer_dir())
