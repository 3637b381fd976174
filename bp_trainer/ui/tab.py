"""`build_tab(host) -> gr.Blocks`: the "BP Train" tab with its Train, Buckets, Tokens and Merge sub-tabs.

The WebUI registers the result from `scripts/` (`on_ui_tabs`: `[(blocks, "BP Train", "bp_train")]`); the
standalone app renders it into its own page (`bp_trainer.ui.standalone`). Nothing here imports the WebUI,
diffusers or accelerate; every callback works through `host` and the core modules. Each sub-tab wires its own
events, page-load ones included (`render.bind`, `render.on_page_load`).
"""

from __future__ import annotations

import os
from typing import Any


def build_tab(host: Any, *, initial_config: "str | os.PathLike[str] | None" = None):
    """Build the tab's gr.Blocks (not rendered: the caller renders it, as the WebUI does with its tabs)."""
    import gradio as gr

    from bp_trainer.ui import buckets_tab, merge_tab, tokens_tab, train_tab

    with gr.Blocks(analytics_enabled=False, elem_id="bp_train_root") as blocks:
        with gr.Tabs(elem_id="bp_train_tabs"):
            with gr.Tab("Train", id="bp_train_tab_train", elem_id="bp_train_tab_train"):
                train = train_tab.build(host, initial_config=os.fspath(initial_config) if initial_config else None)
            with gr.Tab("Buckets", id="bp_train_tab_buckets", elem_id="bp_train_tab_buckets"):
                buckets_tab.build(host, train)
            with gr.Tab("Tokens", id="bp_train_tab_tokens", elem_id="bp_train_tab_tokens"):
                tokens_tab.build(host, train)
            with gr.Tab("Merge", id="bp_train_tab_merge", elem_id="bp_train_tab_merge"):
                merge_tab.build(host)
    return blocks
