"""DEV ONLY: trained tag embeddings in a live WebUI v1.10.1 — fidelity of the conditioning and the token counter.

Run with the dev venv against a running WebUI that has BP Train and the dev probe (`dev/webui_probe`) in its
extensions folder and `--checkpoint` loaded (the harness in /work/shared/webui-harness gives such a WebUI):

    ln -s "$PWD/dev/webui_probe" "$WEBUI/extensions/bp-dev-probe"      # then (re)start the WebUI
    .venv/bin/python dev/webui_embedding_fidelity.py --checkpoint "$WEBUI/models/Stable-diffusion/random-sd15.safetensors" \
        --embeddings-dir "$WEBUI/embeddings" [--url http://127.0.0.1:7861] [--out DIR] [--json results.json] \
        [--browser [--shots DIR]] [--emphasis Original,None]
    # a finished run's files instead (its trained checkpoint loaded in the WebUI, its embedding published):
    .venv/bin/python dev/webui_embedding_fidelity.py --checkpoint "$WEBUI/models/Stable-diffusion/bp-train/RUN-s000002.safetensors" \
        --embeddings-dir "$WEBUI/embeddings" --embedding RUN_DIR/embeddings/fuzichoco.safetensors

The trainer env inside the WebUI (`trainer-venv/bin/python`, with PYTHONPATH=. and HF_HUB_OFFLINE=1) runs it too
(without --browser): that is the torch the trainer uses there.

What it does:
1. loads the checkpoint's text encoder and tokenizer the trainer's way (`load_diffusers_components`), plans tag
   embeddings with the trainer's own code (`plan_embeddings`, `TagEmbeddings`): `fuzichoco` and
   `by_amanogawa_kyousuke` (one vector per CLIP piece) and `hoshizora mitsuki` with 2 vectors for 6 pieces;
   moves every vector away from its start (deterministic noise), so the check is not the plain caption's;
2. exports them with the trainer's exporter (`TagEmbeddings.export`: the files a run writes) and publishes them as a
   finished run does (`run_controller.publish_embedding`: EMB_DIR/bp-train/<name>.safetensors), then
   `POST /sdapi/v1/refresh-embeddings` and checks the WebUI's embedding database holds them with their vectors;
3. for each prompt, clip skip 1 and 2: the trainer's conditioning (`encode_captions(..., embeddings=...)`) against
   the WebUI's (`shared.sd_model.get_learned_conditioning`, through the probe): max abs difference; and the plain
   caption's difference, to show the vectors matter;
4. the WebUI's prompt-box counter (`modules.ui.update_token_counter`) against BP Train's `POST /bp-train/v1/tokens`,
   and that the Tokens tab's chip renderer draws each embedding as one chip; with `--browser`, the same typed into
   txt2img and the Tokens tab in Debian's chromium.

Exit code 0 when every difference is <= --tol and every count agrees; the published files stay in place
(remove EMB_DIR/bp-train/ yourself).

With the harness's random checkpoint (final LayerNorm weight 1, bias 0: every token's hidden state has mean ~0),
the WebUI's "Original" emphasis can give a whole chunk of NaN: it rescales each chunk by mean_before / mean_after
and a chunk's mean can be exactly 0.0 (0/0). That is the WebUI's arithmetic on an untrained model, not a trainer
difference; the probe reports those means and the "None" emphasis (no rescaling) measures the same chunks. A real
checkpoint's final LayerNorm has a bias, so its means are far from 0.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import re
import sys
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

PROMPTS = [  # (caption as the trainer sees it, prompt as typed in txt2img)
    ("1girl, by fuzichoco, long hair", "1girl, by fuzichoco, long hair"),
    ("1girl, solo, fuzichoco, long_hair, by_amanogawa_kyousuke, smile",
     "1girl, solo, fuzichoco, long_hair, by amanogawa kyousuke, smile"),
    ("1girl, by amanogawa kyousuke, hoshizora mitsuki, fuzichoco", "1girl, by amanogawa kyousuke, hoshizora mitsuki, fuzichoco"),
    ("hoshizora mitsuki, 1girl, outdoors", "hoshizora mitsuki, 1girl, outdoors"),
]
LONG_TAIL = ", ".join(f"tag{i}" for i in range(20))
PROMPTS += [  # two and three chunks: embeddings far from the start, and one that the chunk rule moves on
    (f"{LONG_TAIL}, by_amanogawa_kyousuke, fuzichoco, {LONG_TAIL}",
     f"{LONG_TAIL}, by amanogawa kyousuke, fuzichoco, {LONG_TAIL}"),
    (", ".join(["masterpiece"] * 36) + ", by_amanogawa_kyousuke, hoshizora mitsuki",
     ", ".join(["masterpiece"] * 36) + ", by amanogawa kyousuke, hoshizora mitsuki"),
    # the comma rule moves the embedding's placeholders on to chunk 2; its vectors stay in chunk 1's padding
    (", ".join(["masterpiece"] * 30) + ", fuzichoco a b c d e f g h i j k l m",
     ", ".join(["masterpiece"] * 30) + ", fuzichoco a b c d e f g h i j k l m"),
]


def call(url: str, path: str, body: "dict | None" = None, method: "str | None" = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method=method or ("POST" if data else "GET"),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        text = resp.read().decode()
    return json.loads(text) if text.strip() else {}


def webui_cond(url: str, prompt: str, clip_skip: int) -> "tuple[torch.Tensor, list]":
    """The WebUI's conditioning, and per chunk the mean of z that its "Original" emphasis divides by."""
    ans = call(url, "/bp-dev/v1/cond", {"prompt": prompt, "clip_skip": clip_skip})
    arr = np.frombuffer(base64.b64decode(ans["data"]), dtype=np.float32).reshape(ans["shape"])
    return torch.from_numpy(arr.copy()), ans.get("emphasis_means") or []


def browser_check(url: str, prompts: list, shots: "str | None", names: list) -> list:
    """In Debian's chromium (Playwright): each prompt typed into txt2img (the WebUI's own counter) and into the
    Tokens tab (its count and its embedding chips: one chip per embedding, however many vectors)."""
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60000)
        page.goto(url)
        page.wait_for_selector("#txt2img_prompt textarea")
        for i, prompt in enumerate(prompts):
            page.click("#tabs .tab-nav button:has-text('txt2img')")
            page.fill("#txt2img_prompt textarea", prompt)
            page.wait_for_timeout(2500)  # the WebUI's counter runs a second after typing stops
            txt2img = page.inner_text("#txt2img_token_counter").strip()
            page.click("#tabs .tab-nav button:has-text('BP Train')")
            page.click("#bp_train_tabs .tab-nav button:has-text('Tokens')")
            page.fill("#bp_train_tok_prompt textarea", prompt)
            if any(n in prompt for n in names):
                page.wait_for_selector("#bp_train_tok_chips .prose .bp-chip-embedding")
            page.wait_for_timeout(1500)  # the chips follow the text box (every prompt here counts differently)
            chips = page.locator("#bp_train_tok_chips .prose .bp-chip-embedding")
            tips = [chips.nth(k).get_attribute("data-tip") for k in range(chips.count())]
            row = {"prompt": prompt, "txt2img": txt2img, "tokens_tab": page.inner_text("#bp_train_token_count").strip(),
                   "chips": len(tips), "chip_tips": tips,
                   "embeddings": sum(prompt.count(n) for n in names)}
            rows.append(row)
            print(f"browser: txt2img counter {row['txt2img']}, Tokens tab {row['tokens_tab']}, embedding chips "
                  f"{row['chips']} {tips}  {prompt[:40]!r}")
            if shots:
                Path(shots).mkdir(parents=True, exist_ok=True)
                page.locator("#bp_train_tok_chips .prose").screenshot(path=str(Path(shots) / f"tokens-{i}.png"))
        browser.close()
    return rows


def plan(tok, te, tags, captions, vectors=None):
    from bp_trainer.train import config as C
    from bp_trainer.train.embeddings import plan_embeddings
    from bp_trainer.train.tag_embeddings import initial_vectors

    plans = plan_embeddings(C.EmbeddingsSection(tags=tuple(tags), vectors=vectors), captions, tok,
                            underscores_to_spaces=False)
    weight = te.get_input_embeddings().weight
    return plans, [initial_vectors(p, weight) for p in plans]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7861")
    ap.add_argument("--checkpoint", required=True, help="the checkpoint the WebUI has loaded")
    ap.add_argument("--embeddings-dir", required=True, help="the WebUI's --embeddings-dir")
    ap.add_argument("--out", help="where the run-like export goes (default: a temporary folder)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--embedding", action="append", help="instead of making embeddings: a run's exported "
                    "RUN_DIR/embeddings/<name>.safetensors, already published into EMB_DIR/bp-train/ (repeatable; "
                    "--checkpoint: the run's trained checkpoint, loaded in the WebUI)")
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--browser", action="store_true", help="also type the prompts into txt2img and the Tokens tab in "
                    "Debian's chromium (Playwright) and compare the counters and the embedding chips")
    ap.add_argument("--shots", help="with --browser: save the Tokens tab's chips as PNGs here")
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--emphasis", default="Original,None",
                    help="the WebUI's emphasis modes to measure under (comma-separated; restored afterwards)")
    args = ap.parse_args()

    from bp_trainer.checkpoint.convert import load_diffusers_components
    from bp_trainer.run_controller import PUBLISH_SUBDIR, publish_embedding
    from bp_trainer.train.models import encode_captions
    from bp_trainer.train.tag_embeddings import TagEmbeddings
    from bp_trainer.ui import render

    torch.manual_seed(0)
    print(f"loading {args.checkpoint} the trainer's way …", flush=True)
    parts = load_diffusers_components(args.checkpoint)
    te, tok = parts["text_encoder"].float().eval(), parts["tokenizer"]
    del parts
    captions = [c for c, _ in PROMPTS]
    if args.embedding:  # a run's files, as published: compared as they are (the WebUI already loaded them)
        plans, vectors, published = [], [], {}
        for f in args.embedding:
            from safetensors import safe_open

            with safe_open(f, framework="pt") as fh:
                tensor, tag = fh.get_tensor("emb_params").float(), (fh.metadata() or {}).get("bp_embedding_tag")
            if not tag:
                raise SystemExit(f"{f}: no bp_embedding_tag in its metadata (not a BP Train export)")
            p, init = plan(tok, te, [tag], captions, vectors=tensor.shape[0])
            plans += p
            vectors.append(tensor)
            published[p[0].name] = str(Path(args.embeddings_dir) / PUBLISH_SUBDIR / Path(f).name)
            print(f"{f}: moved from its initial vectors by max {float((tensor - init[0]).abs().max()):.3g}")
        emb = TagEmbeddings(plans, vectors)
        records = [{"name": p.name, "tag": p.tag, "vectors": p.vectors} for p in plans]
    else:
        plans_a, init_a = plan(tok, te, ["fuzichoco", "by_amanogawa_kyousuke"], captions)
        plans_b, init_b = plan(tok, te, ["hoshizora mitsuki"], captions, vectors=2)
        emb = TagEmbeddings(plans_a + plans_b, init_a + init_b)
        gen = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():  # "trained" vectors: moved by half their own spread, deterministically
            for v in emb.vectors:
                v.add_(0.5 * v.std() * torch.randn(v.shape, generator=gen))
        out = Path(args.out or tempfile.mkdtemp(prefix="bp-emb-fidelity-"))
        records = emb.export(out / "run", metadata={"bp_train_step": "1", "bp_base_model": Path(args.checkpoint).name})
        published = {r["name"]: str(publish_embedding(r["path"], args.embeddings_dir)) for r in records}
    results: dict = {"checkpoint": args.checkpoint,
                     "embeddings": [{"name": r["name"], "tag": r["tag"], "vectors": r["vectors"],
                                     "pieces": len(p.init_ids), "published": published[r["name"]]}
                                    for r, p in zip(records, emb.plans)], "cond": [], "counts": []}
    for e in results["embeddings"]:
        print(f"embedding {e['name']!r} (tag {e['tag']}): {e['vectors']} vectors from {e['pieces']} pieces -> "
              f"{e['published']}")

    call(args.url, "/sdapi/v1/refresh-embeddings", {}, method="POST")
    db = call(args.url, "/bp-dev/v1/embeddings")
    api = call(args.url, "/sdapi/v1/embeddings")
    ok = True
    for e in results["embeddings"]:
        got = db["loaded"].get(e["name"])
        e["webui_loaded"] = got
        e["sdapi_vectors"] = (api.get("loaded", {}).get(e["name"]) or {}).get("vectors")
        good = got is not None and got["vectors"] == e["vectors"] and Path(got["file"]) == Path(e["published"])
        ok &= good
        print(f"  WebUI embedding DB: {e['name']!r} -> {got} (/sdapi/v1/embeddings vectors {e['sdapi_vectors']})"
              f"{'' if good else '   <-- MISMATCH'}")
    if db.get("skipped"):
        print(f"  skipped by the WebUI: {sorted(db['skipped'])}")

    worst = 0.0
    emphasis_before = call(args.url, "/sdapi/v1/options").get("emphasis", "Original")
    try:
        for emphasis in args.emphasis.split(","):
            call(args.url, "/sdapi/v1/options", {"emphasis": emphasis})
            for caption, prompt in PROMPTS:
                if args.embedding:  # the `_` forms of the captions are the trained ones'; others read as typed
                    caption = prompt
                for clip_skip in (1, 2):
                    with torch.no_grad():
                        ours = encode_captions(te, tok, [caption], clip_skip=clip_skip, max_chunks=8, embeddings=emb)
                        plain = encode_captions(te, tok, [caption], clip_skip=clip_skip, max_chunks=8)
                    theirs, means = webui_cond(args.url, prompt, clip_skip)
                    same_shape = tuple(ours.shape) == tuple(theirs.shape)
                    diff = float((ours - theirs).abs().max()) if same_shape else float("inf")
                    vs_plain = float((plain - theirs).abs().max()) if plain.shape == theirs.shape else float("nan")
                    nan = int(torch.isnan(theirs).sum())
                    worst = max(worst, diff) if not math.isnan(diff) else worst  # a NaN fails through `ok`
                    webui_zero_mean = bool(nan) and 0.0 in means  # the WebUI's 0/0 (see above): not comparable
                    ok &= diff <= args.tol or webui_zero_mean
                    results["cond"].append({"prompt": prompt, "caption": caption, "clip_skip": clip_skip,
                                            "emphasis": emphasis, "shape": list(theirs.shape), "max_abs_diff": diff,
                                            "plain_vs_webui": vs_plain, "webui_nan_values": nan,
                                            "webui_emphasis_means": means, "webui_zero_mean": webui_zero_mean})
                    note = (f"  <-- the WebUI's conditioning holds {nan} NaN values (its emphasis divided by the "
                            f"chunk means {means})" if nan else "")
                    print(f"emphasis {emphasis}, clip skip {clip_skip} {tuple(theirs.shape)}: max|trainer - WebUI| = "
                          f"{diff:.3g}  (plain caption vs WebUI: {vs_plain:.3g})  {prompt[:50]!r}{note}")
    finally:
        call(args.url, "/sdapi/v1/options", {"emphasis": emphasis_before})

    for _caption, prompt in PROMPTS:
        html = call(args.url, "/bp-dev/v1/count", {"prompt": prompt})["html"]
        m = re.search(r">(\d+)/(\d+)<", html)
        webui_count = (int(m.group(1)), int(m.group(2))) if m else None
        ans = call(args.url, "/bp-train/v1/tokens", {"text": prompt})
        ours_count = (ans["count"], ans["limit"])
        used = sorted({n for t in ans["tags"] for n in (t.get("embeddings") or [])})
        emb_chips = render.token_chips_html(ans).count("bp-chip-embedding")  # the Tokens tab's chips
        good = webui_count == ours_count
        ok &= good
        results["counts"].append({"prompt": prompt, "webui": webui_count, "bp_train": ours_count,
                                  "embeddings": used, "embedding_chips": emb_chips})
        print(f"count: WebUI {webui_count}  /bp-train/v1/tokens {ours_count}  embeddings {used}  "
              f"embedding chips {emb_chips}{'' if good else '   <-- MISMATCH'}  {prompt[:50]!r}")

    if args.browser:
        results["browser"] = browser_check(args.url, [p for _c, p in PROMPTS], args.shots, emb.names)
        ok &= all(r["txt2img"] == r["tokens_tab"] and r["chips"] == r["embeddings"] for r in results["browser"])

    results["max_abs_diff"], results["ok"] = worst, bool(ok)
    print(f"worst finite max abs difference {worst:.3g} (tol {args.tol}); {'OK' if ok else 'FAILED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
