"""DEV ONLY: a throwaway WebUI extension for checks against a live WebUI v1.10.1 (never part of the product).

Link it into a test WebUI's extensions folder next to BP Train, then (re)start the WebUI:

    ln -s "$PWD/dev/webui_probe" "$WEBUI/extensions/bp-dev-probe"

It adds three routes that read what the WebUI itself computes (used by dev/webui_embedding_fidelity.py):

    POST /bp-dev/v1/cond   {prompt, clip_skip}  shared.sd_model.get_learned_conditioning([prompt]) with
                                                opts.CLIP_stop_at_last_layers = clip_skip (restored after),
                                                as float32 bytes (base64) + shape, and per chunk the
                                                mean of z that "Original" emphasis divides by
    POST /bp-dev/v1/count  {prompt, steps?}     the txt2img prompt box's token counter (modules.ui.update_token_counter)
    GET  /bp-dev/v1/embeddings                  the embedding database: loaded {name: vectors, shape, file}, skipped
"""

import base64

from modules import script_callbacks


def _routes(_demo, app):
    import torch
    from fastapi import Body

    from modules import call_queue, sd_hijack, shared

    @app.post("/bp-dev/v1/cond")
    def cond(body: dict = Body(...)):
        prompt, clip_skip = str(body["prompt"]), int(body.get("clip_skip", 1))
        from modules import sd_emphasis

        means = []  # per chunk: the mean of z before and after the multipliers ("Original" emphasis restores it)
        cls = sd_emphasis.EmphasisOriginal
        real = cls.after_transformers

        def traced(self):
            before = self.z.mean().item()
            real(self)
            means.append(before)

        with call_queue.queue_lock:
            old = shared.opts.CLIP_stop_at_last_layers
            shared.opts.CLIP_stop_at_last_layers = clip_skip
            cls.after_transformers = traced
            try:
                with torch.no_grad():
                    c = shared.sd_model.get_learned_conditioning([prompt])
            finally:
                cls.after_transformers = real
                shared.opts.CLIP_stop_at_last_layers = old
        c = c.detach().to("cpu", torch.float32).contiguous()
        return {"shape": list(c.shape), "dtype": "float32", "data": base64.b64encode(c.numpy().tobytes()).decode(),
                "emphasis_means": means,
                "model": getattr(shared.sd_model, "sd_checkpoint_info", None) and shared.sd_model.sd_checkpoint_info.title}

    @app.post("/bp-dev/v1/count")
    def count(body: dict = Body(...)):
        from modules import ui

        html = ui.update_token_counter(str(body["prompt"]), int(body.get("steps", 20)), [])
        return {"html": html}

    @app.get("/bp-dev/v1/embeddings")
    def embeddings():
        db = sd_hijack.model_hijack.embedding_db

        def row(e):
            return {"vectors": int(e.vectors), "shape": int(e.shape), "file": str(e.filename), "step": e.step}

        return {"loaded": {n: row(e) for n, e in db.word_embeddings.items()},
                "skipped": {n: row(e) for n, e in db.skipped_embeddings.items()},
                "dirs": [str(d) for d in db.embedding_dirs]}


script_callbacks.on_app_started(_routes)
