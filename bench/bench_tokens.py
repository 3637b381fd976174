"""Benchmark of the tokenizer tools: dataset tag audit, rename dry run, prompt inspection.

    .venv/bin/python bench/bench_tokens.py [--captions 5000] [--tags 30] [--distinct 4000] [--repeat 5]

Writes a synthetic dataset (empty image files; the audit never opens images) of `--captions` captions with
`--tags` tags each, drawn with a Zipf-like law from `--distinct` tags (common Danbooru-style tags plus
made-up romanized names, the kind CLIP splits into many pieces), then times:
- audit (cold): a fresh tokenizer cache, reading every caption, counting, tokenizing each distinct tag once;
- audit (warm): the same with the tokenizer cache filled (what the UI sees on a second look);
- rename dry run of one frequent tag over all captions;
- replacement suggestions for a mangled tag (cold cache: the dataset's tags are tokenized again);
- inspect_prompt / token_counter on a 60-tag prompt with a schedule, and the counter on a prompt of 100
  `tag (word:1.1) [x:y:0.5]` groups (parse cache cold, then warm);
- hostile `/tokens` requests through the real FastAPI app (`--hostile`, or alone with `--only-hostile`): how long
  each takes to be answered and what the answer is (a result, or the 4xx naming the field).
Prints a JSON report (median and min of `--repeat` runs, seconds) and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COMMON = ["1girl", "1boy", "solo", "long_hair", "short_hair", "smile", "looking_at_viewer", "blush", "open_mouth",
          "blue_eyes", "brown_hair", "black_hair", "skirt", "shirt", "school_uniform", "outdoors", "sky", "day",
          "simple_background", "white_background", "holding", "standing", "sitting", "jewelry", "hat", "dress",
          "thighhighs", "bow", "ribbon", "gloves", "closed_eyes", "red_eyes", "twintails", "ponytail", "flower"]
SYLLABLES = ["sa", "ki", "mi", "chan", "yo", "shi", "ta", "ka", "ama", "no", "ru", "to", "ko", "wa", "ra", "zu",
             "ha", "ne", "mo", "ri", "ku", "vsh", "ino", "lop", "tsu", "ya", "gi", "be", "da", "pe"]


def make_tags(n: int, rng: random.Random) -> list[str]:
    tags = list(COMMON)
    while len(tags) < n:
        kind = rng.random()
        if kind < 0.35:  # romanized artist / character names
            name = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 5)))
            tags.append(name if rng.random() < 0.5 else f"{name}_(artist)")
        else:  # two-word descriptive tags
            tags.append(f"{rng.choice(COMMON).split('_')[0]}_{rng.choice(SYLLABLES)}{rng.randint(0, 999)}")
    return list(dict.fromkeys(tags))[:n]


def write_dataset(root: Path, captions: int, per_caption: int, distinct: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    tags = make_tags(distinct, rng)
    weights = [1.0 / (i + 1) for i in range(len(tags))]  # Zipf-like
    uses = 0
    for i in range(captions):
        folder = root / f"part{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        chosen = list(dict.fromkeys(rng.choices(tags, weights=weights, k=per_caption * 2)))[:per_caption]
        uses += len(chosen)
        (folder / f"{i:06d}.txt").write_text(", ".join(chosen) + "\n", encoding="utf-8")
        (folder / f"{i:06d}.png").write_bytes(b"")
    return uses


def timed(fn, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {"median_s": round(statistics.median(runs), 4), "min_s": round(min(runs), 4), "runs": len(runs)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=5000)
    ap.add_argument("--tags", type=int, default=30)
    ap.add_argument("--distinct", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--hostile", action="store_true", help="also time hostile /tokens requests")
    ap.add_argument("--only-hostile", action="store_true", help="only the hostile /tokens requests")
    args = ap.parse_args()
    if args.only_hostile:
        from bp_trainer.clip_vocab import clip_tokenizer

        report = {"hostile_tokens_requests": hostile_requests(clip_tokenizer())}
        report["machine"] = _machine()
        print(json.dumps(report, indent=2))
        return 0

    from bp_trainer.clip_vocab import clip_tokenizer
    from bp_trainer.tokens import inspect_prompt, token_counter
    from bp_trainer.tokens.audit import audit_dataset
    from bp_trainer.tokens.rename import plan_rename
    from bp_trainer.tokens.schedules import _parse_cached
    from bp_trainer.tokens.suggest import suggest_replacements
    from bp_trainer.tokens.tokenizer import TokenizerView

    t0 = time.perf_counter()
    tokenizer = clip_tokenizer()
    load_s = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="bp_bench_tokens_") as tmp:
        root = Path(tmp) / "dataset"
        uses = write_dataset(root, args.captions, args.tags, args.distinct)
        probe = audit_dataset(root, TokenizerView(tokenizer))
        report = {
            "dataset": {"captions": probe["captions"], "tag_uses": uses, "distinct_tags": probe["distinct_tags"],
                        "flagged_mangled": probe["flagged"]},
            "tokenizer_load_s": round(load_s, 3),
            # A new TokenizerView each run: nothing cached, every distinct tag is tokenized.
            "audit_cold": timed(lambda: audit_dataset(root, TokenizerView(tokenizer)), args.repeat),
            "audit_warm": timed(lambda: audit_dataset(root, tokenizer), args.repeat),
            "rename_dry_run": timed(lambda: plan_rename(root, "long_hair", "long hair"), args.repeat),
            "suggest_cold": timed(lambda: suggest_replacements(root, "sakimichan", TokenizerView(tokenizer)),
                                  args.repeat),
        }
        prompt = ", ".join(make_tags(60, random.Random(1))[:60]) + ", [day:night:0.5]"
        report["prompt"] = {"tags": 61, "count": token_counter(prompt, tokenizer)[0]}
        report["inspect_prompt"] = timed(lambda: inspect_prompt(prompt, TokenizerView(tokenizer)), args.repeat)
        # Many emphasis + schedule groups: the Earley parse is the cost (parse cache cleared before each run).
        heavy = ", ".join(f"tag{i} (word:1.1) [x:y:0.5]" for i in range(100))

        def heavy_cold():
            _parse_cached.cache_clear()
            token_counter(heavy, TokenizerView(tokenizer))

        report["counter_100_schedule_groups_cold"] = timed(heavy_cold, max(1, args.repeat // 2))
        report["counter_100_schedule_groups_cached"] = timed(lambda: token_counter(heavy, tokenizer, steps=30),
                                                             args.repeat)
    if args.hostile:
        report["hostile_tokens_requests"] = hostile_requests(tokenizer)
    report["machine"] = _machine()
    print(json.dumps(report, indent=2))
    return 0


def hostile_prompts() -> dict:
    """Prompts that were slow (or still are costly) to count, each about 16 KB (the limit) unless said otherwise."""
    def fill(unit: str, size: int = 16 * 1024) -> str:  # whole units only: brackets stay balanced
        return unit * (size // len(unit))

    tags = "masterpiece, best quality, 1girl, (long_hair:1.2), [smile], looking_at_viewer, by_sakimichan, "
    return {
        "1 MB of tags with [a|b]": fill("masterpiece, (best:1.2) [a|b] ", 1024 * 1024),
        "13 KB of tags": fill(tags, 13 * 1024),
        "16 KB of tags": fill(tags),
        "52 KB of tags": fill(tags, 52 * 1024),
        "16 KB ',,,,'": fill(","),
        "16 KB '(a ' unclosed": fill("(a "),
        "16 KB unbalanced schedules": fill("[a:b:3] ( x, "),
        "16 KB adjacent groups '[a:b:3][c|d](x:1.2)'": fill("[a:b:3][c|d](x:1.2)"),
        "16 KB distinct '[tN:uN:k]' schedules": ", ".join(f"[t{i}:u{i}:{i % 7 + 1}]" for i in range(1000)),
        "16 KB distinct nested '[(wN:1.1):vN:k]'": ", ".join(f"[(w{i}:1.1):v{i}:{i % 9 + 1}]" for i in range(700)),
        "16 KB '[a|b], ' at 150 steps": fill("[a|b], "),
        "16 KB Japanese tags": fill("初音ミク, "),
        "16 KB '<a:' (extra-network look-alikes)": fill("<a:"),
        "16 KB of spaces between two words": "a" + " " * (16 * 1024 - 2) + "b",
        "4,000 x '(a)' (one 4,000-letter word)": "(a)" * 4000,
    }


def hostile_requests(tokenizer) -> dict:
    """Each hostile prompt POSTed to /bp-train/v1/tokens of the real router: seconds until the answer, status,
    and the answer's count or error (steps 150 for the alternation case, else the default)."""
    import asyncio

    import httpx
    from fastapi import FastAPI

    from bp_trainer.api import create_router
    from bp_trainer.tokens.schedules import _parse_cached

    class Host:
        name = "bench"

        def tokenizer(self):
            return tokenizer

    app = FastAPI()
    app.include_router(create_router(Host()))

    async def post(body):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench", timeout=None) as client:
            return await client.post("/bp-train/v1/tokens", json=body)

    out = {}
    for name, text in hostile_prompts().items():
        body = {"text": text, **({"steps": 150} if "150 steps" in name else {})}
        _parse_cached.cache_clear()
        t0 = time.perf_counter()
        r = asyncio.run(post(body))
        seconds = time.perf_counter() - t0
        answer = r.json()
        out[name] = {"chars": len(text), "seconds": round(seconds, 3), "status": r.status_code,
                     "answer": answer["count"] if r.status_code == 200 else answer["detail"][:110]}
    return out


def _machine() -> dict:
    import transformers

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": _cpu_name(), "transformers": transformers.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
