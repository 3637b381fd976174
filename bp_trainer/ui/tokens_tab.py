"""The Tokens sub-tab: a prompt's CLIP pieces as chips, the dataset tag audit, tag rename, suggestions.

All the work is the tokens module's (`bp_trainer.tokens`); callbacks turn its plain dicts into HTML and
tables. The tokenizer is the host's (`host.tokenizer()`: the loaded model's inside the WebUI).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

from bp_trainer.errors import BPError
from bp_trainer.ui import render

AUDIT_HEADERS = ["tag", "images", "pieces", "tokens", "flag"]
RENAME_HEADERS = ["file", "before", "after"]
SUGGEST_HEADERS = ["replacement", "token id", "reason"]


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if hasattr(obj, n):
            return getattr(obj, n)
    return default


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(obj)
    return obj


class TokensCallbacks:
    def __init__(self, host: Any):
        self.host = host

    # ------------------------------------------------------------------------------------ prompt

    def inspect(self, prompt: str, steps: Any = 20, negative: bool = False) -> str:
        from bp_trainer.tokens import inspect_prompt

        try:
            result = inspect_prompt(prompt or "", self.host.tokenizer(), steps=int(steps or 20), negative=bool(negative))
        except BPError as exc:
            return render.error_html(exc)
        return render.token_chips_html(result)

    # ------------------------------------------------------------------------------------ audit

    def audit(self, dataset: str, focus: str = "", only_flagged: bool = False) -> Tuple[List[List[Any]], str]:
        """Rows of the audit table (most frequent first) and a summary line."""
        from bp_trainer import tokens

        if not (dataset or "").strip():
            return [], render.message_html("enter a dataset folder first", "warn")
        kwargs: dict = {}
        focus = (focus or "").strip()
        if focus:
            kwargs["pattern"] = focus
        try:
            report = _as_dict(tokens.audit_dataset(dataset.strip(), self.host.tokenizer(), **kwargs))
        except BPError as exc:
            return [], render.error_html(exc)
        tags = _get(report, "tags", default=[]) or []
        rows = []
        for t in tags:
            t = _as_dict(t)
            pieces = _get(t, "pieces", default=[]) or []
            n = int(_get(t, "piece_count", "n_pieces", "token_count", default=len(pieces)) or 0)
            flagged = bool(_get(t, "flagged", "flag", default=n >= 3))
            if only_flagged and not flagged:
                continue
            rows.append([_get(t, "tag", "text", "name", default=""), int(_get(t, "count", "images", "frequency", default=0)),
                         " ".join(render._piece_text(p) + ("\u2423" if str(p).endswith("</w>") else "") for p in pieces),
                         n, "3+ pieces" if flagged else ""])
        n_tags = len(tags)
        n_flagged = sum(1 for r in rows if r[4]) if not only_flagged else len(rows)
        files = _get(report, "files", "captions", "images", default=None)
        files_n = len(files) if isinstance(files, (list, tuple)) else files
        bits = [f"{n_tags} distinct tags"]
        if files_n is not None:
            bits.insert(0, f"{files_n} captions")
        bits.append(f"{n_flagged} split into 3+ CLIP pieces")
        return rows, render.message_html(", ".join(bits), "info")

    # ------------------------------------------------------------------------------------ rename

    def rename_preview(self, dataset: str, old: str, new: str) -> Tuple[List[List[Any]], str]:
        from bp_trainer import tokens

        try:
            plan = _as_dict(tokens.plan_rename(dataset.strip(), old.strip(), new.strip()))
        except BPError as exc:
            return [], render.error_html(exc)
        changes = _get(plan, "changes", "files", default=[]) or []
        rows = []
        for ch in changes:
            ch = _as_dict(ch)
            rows.append([str(_get(ch, "path", "file", "caption_path", default="")),
                         str(_get(ch, "before", "old", "old_text", default="")).strip(),
                         str(_get(ch, "after", "new", "new_text", default="")).strip()])
        msg = f"{len(rows)} caption file{'s' if len(rows) != 1 else ''} would change: '{old.strip()}' \u2192 '{new.strip()}'"
        return rows, render.message_html(msg if rows else f"no caption has the tag '{old.strip()}'", "info" if rows else "warn")

    def rename_apply(self, dataset: str, old: str, new: str) -> Tuple[str, str]:
        """(message, journal path for Undo)."""
        from bp_trainer import tokens

        try:
            plan = tokens.plan_rename(dataset.strip(), old.strip(), new.strip())
            result = _as_dict(tokens.apply_rename(plan))
        except BPError as exc:
            return render.error_html(exc), ""
        journal = str(_get(result, "journal", "journal_path", default="") or "")
        n = _get(result, "changed", "files_changed", "applied", default=None)
        n = len(n) if isinstance(n, (list, tuple)) else n
        text = f"renamed '{old.strip()}' \u2192 '{new.strip()}'" + (f" in {n} files" if n is not None else "")
        if journal:
            text += f" (undo journal: {journal})"
        return render.message_html(text, "ok"), journal

    def rename_undo(self, journal: str) -> str:
        from bp_trainer import tokens

        if not (journal or "").strip():
            return render.message_html("no rename to undo (apply one first, or paste a journal path)", "warn")
        try:
            result = _as_dict(tokens.undo_rename(journal.strip()))
        except BPError as exc:
            return render.error_html(exc)
        n = _get(result, "restored", "files", default=None)
        n = len(n) if isinstance(n, (list, tuple)) else n
        return render.message_html("rename undone" + (f": {n} files restored" if n is not None else ""), "ok")

    # ------------------------------------------------------------------------------------ suggest

    def suggest(self, dataset: str, tag: str, count: Any = 12) -> Tuple[List[List[Any]], str]:
        from bp_trainer import tokens

        if not (tag or "").strip():
            return [], render.message_html("enter the tag to replace", "warn")
        try:
            result = _as_dict(tokens.suggest_replacements(dataset.strip(), tag.strip(), self.host.tokenizer(),
                                                          limit=int(count or 12)))
        except BPError as exc:
            return [], render.error_html(exc)
        items = result if isinstance(result, list) else (_get(result, "suggestions", "candidates", default=[]) or [])
        rows = []
        for s in items:
            s = _as_dict(s)
            rows.append([_get(s, "text", "token", "replacement", default=""), _get(s, "id", "token_id", default=""),
                         _get(s, "reason", "why", default="")])
        head = ""
        if isinstance(result, dict):
            pieces = _get(result, "pieces", default=None)
            if pieces:
                head = f"'{tag.strip()}' is {len(pieces)} CLIP pieces; "
        return rows, render.message_html(f"{head}{len(rows)} single-token replacements", "info")


def build(host: Any, train: Any = None) -> TokensCallbacks:
    import gradio as gr

    cb = TokensCallbacks(host)
    dataset_default = ""
    if train is not None and getattr(train, "initial_values", None):
        dataset_default = train.initial_values.get("dataset", "")
    with gr.Column(elem_id="bp_train_tokens"):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="bp_train_tok_prompt", scale=5,
                                placeholder="masterpiece, 1girl, (by_sakimichan:1.2), long_hair, ...")
            with gr.Column(scale=1, min_width=160):
                steps = gr.Number(label="Sampling steps", value=20, precision=0, elem_id="bp_train_tok_steps")
                negative = gr.Checkbox(label="Negative prompt", value=False, elem_id="bp_train_tok_negative")
        chips = gr.HTML(render.token_chips_html({"tags": []}), elem_id="bp_train_tok_chips")
        with gr.Accordion("Dataset tags", open=True, elem_id="bp_train_tok_dataset_box"):
            with gr.Row():
                dataset = gr.Textbox(label="Dataset folder", value=dataset_default, elem_id="bp_train_tok_dataset", scale=4)
                focus = gr.Textbox(label="Focus (regular expression, optional)", elem_id="bp_train_tok_focus", scale=2,
                                   placeholder="^by_")
                only_flagged = gr.Checkbox(label="Only tags of 3+ pieces", value=False, elem_id="bp_train_tok_flagged")
                audit = gr.Button("Audit tags", variant="primary", elem_id="bp_train_tok_audit")
            audit_msg = gr.HTML(elem_id="bp_train_tok_audit_msg")
            table = gr.Dataframe(headers=AUDIT_HEADERS, datatype=["str", "number", "str", "number", "str"],
                                 interactive=False, wrap=True, elem_id="bp_train_tok_table", max_rows=20)
        with gr.Accordion("Rename a tag", open=False, elem_id="bp_train_tok_rename_box"):
            with gr.Row():
                old = gr.Textbox(label="Tag", elem_id="bp_train_tok_old")
                new = gr.Textbox(label="New tag", elem_id="bp_train_tok_new")
                preview = gr.Button("Preview", elem_id="bp_train_tok_preview")
                apply = gr.Button("Apply", variant="primary", elem_id="bp_train_tok_apply")
            with gr.Row():
                journal = gr.Textbox(label="Undo journal", elem_id="bp_train_tok_journal", scale=4)
                undo = gr.Button("Undo", elem_id="bp_train_tok_undo")
            rename_msg = gr.HTML(elem_id="bp_train_tok_rename_msg")
            changes = gr.Dataframe(headers=RENAME_HEADERS, interactive=False, wrap=True,
                                   elem_id="bp_train_tok_changes", max_rows=15)
        with gr.Accordion("Suggest single-token replacements", open=False, elem_id="bp_train_tok_suggest_box"):
            with gr.Row():
                sug_tag = gr.Textbox(label="Mangled tag", elem_id="bp_train_tok_sug_tag", placeholder="by_sakimichan")
                sug_n = gr.Number(label="How many", value=12, precision=0, elem_id="bp_train_tok_sug_n")
                suggest = gr.Button("Suggest", elem_id="bp_train_tok_suggest")
            sug_msg = gr.HTML(elem_id="bp_train_tok_sug_msg")
            sug_table = gr.Dataframe(headers=SUGGEST_HEADERS, interactive=False, wrap=True,
                                     elem_id="bp_train_tok_sug_table", max_rows=15)

    for event in (prompt.change, steps.change, negative.change):
        event(cb.inspect, [prompt, steps, negative], [chips], show_progress="hidden", queue=False)
    audit.click(cb.audit, [dataset, focus, only_flagged], [table, audit_msg], show_progress="minimal")
    preview.click(cb.rename_preview, [dataset, old, new], [changes, rename_msg], show_progress="minimal")
    apply.click(cb.rename_apply, [dataset, old, new], [rename_msg, journal], show_progress="minimal")
    undo.click(cb.rename_undo, [journal], [rename_msg], show_progress="minimal")
    suggest.click(cb.suggest, [dataset, sug_tag, sug_n], [sug_table, sug_msg], show_progress="minimal")
    if train is not None and getattr(train, "components", None):
        train.components["dataset"].change(lambda v: v, [train.components["dataset"]], [dataset], queue=False,
                                           show_progress="hidden")
    return cb
