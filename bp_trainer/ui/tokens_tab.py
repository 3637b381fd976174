"""The Tokens sub-tab: a prompt's CLIP pieces as chips, the dataset tag audit, tag rename, suggestions.

All the work is the tokens module's (`bp_trainer.tokens`); callbacks turn its plain dicts into HTML and
tables and return them as {output component: value} (`TokensOutputs`), so no value depends on its position
in a list. The tokenizer is the host's (`host.tokenizer()`: the loaded model's inside the WebUI).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from bp_trainer.errors import BPError
from bp_trainer.ui import render

AUDIT_HEADERS = ["tag", "images", "pieces", "tokens", "words CLIP cuts apart"]
RENAME_HEADERS = ["file", "before", "after"]
SUGGEST_HEADERS = ["replacement", "token id", "reason"]


def _pieces_text(pieces: Sequence[str]) -> str:
    """CLIP pieces readable in a table cell: decoded, word ends marked with ␣."""
    return " ".join(render._piece_text(p) + ("\u2423" if str(p).endswith("</w>") else "") for p in pieces)


def _mangled_text(mangled: Sequence[dict]) -> str:
    return "; ".join(m["shown"] for m in mangled)


@dataclass(frozen=True)
class TokensOutputs:
    """Where the callbacks' values go: the tab's gradio components (`build`), or, by default, the names of
    the fields (tests read a callback's answer by name). Each callback returns {output: value}."""

    chips: Any = "chips"
    table: Any = "table"
    audit_msg: Any = "audit_msg"
    old: Any = "old"
    new: Any = "new"
    changes: Any = "changes"
    rename_msg: Any = "rename_msg"
    journal: Any = "journal"
    sug_tag: Any = "sug_tag"
    sug_table: Any = "sug_table"
    sug_msg: Any = "sug_msg"


class TokensCallbacks:
    def __init__(self, host: Any, outputs: TokensOutputs = TokensOutputs()):
        self.host = host
        self.out = outputs

    # ------------------------------------------------------------------------------------ prompt

    def prompt_settings(self) -> dict:
        """The host's prompt settings (WebUI: emphasis mode, comma back-off, loaded embeddings), or none."""
        from bp_trainer.tokens.host_settings import prompt_settings_of

        return prompt_settings_of(self.host)

    def inspect(self, prompt: str, steps: Any = 20, negative: bool = False) -> Dict[Any, str]:
        """The prompt's chips, counted as `/tokens` counts (same step rule and limits, one of its slots)."""
        from bp_trainer.tokens import inspect_prompt
        from bp_trainer.tokens.limits import parse_steps
        from bp_trainer.tokens.request import TokensBusy, counting_slot

        try:
            with counting_slot():
                result = inspect_prompt(prompt or "", self.host.tokenizer(), steps=parse_steps(steps),
                                        negative=bool(negative), **self.prompt_settings())
        except BPError as exc:
            return {self.out.chips: render.error_html(exc)}
        except TokensBusy as exc:
            return {self.out.chips: render.message_html(str(exc), "warn")}
        return {self.out.chips: render.token_chips_html(result)}

    # ------------------------------------------------------------------------------------ audit

    def audit(self, dataset: str, pattern: str = "", only_flagged: bool = False, sort: str = "count") -> Dict[Any, Any]:
        """The audit table (tag, images, pieces, tokens, the words CLIP cuts apart) and a summary line."""
        from bp_trainer.tokens.audit import audit_dataset

        dataset = (dataset or "").strip()
        if not dataset:
            return self._audit([], render.message_html("enter a dataset folder first", "warn"))
        try:
            report = audit_dataset(dataset, self.host.tokenizer(), pattern=(pattern or "").strip() or None,
                                   flagged_only=bool(only_flagged), sort=sort or "count")
        except BPError as exc:
            return self._audit([], render.error_html(exc))
        rows = [[r["tag"], r["count"], _pieces_text(r["pieces"]), r["n_pieces"], _mangled_text(r["mangled"])]
                for r in report["tags"]]
        text = (f"{report['captions']} captions, {report['distinct_tags']} distinct tags"
                + (f", {report['selected_tags']} matching" if (pattern or "").strip() else "")
                + f"; {report['flagged']} flagged: a word CLIP cuts into meaningless pieces"
                + (" \u2014 click a tag to rename it or find single-token replacements" if rows else ""))
        return self._audit(rows, render.message_html(text, "info"))

    def _audit(self, rows: List[List[Any]], message: str) -> Dict[Any, Any]:
        return {self.out.table: rows, self.out.audit_msg: message}

    def embeddings_for_flagged(self, dataset: str, pattern: str = "") -> "tuple[Any, str]":
        """"Train embeddings for the flagged tags": (the Train form's embeddings list, one tag per line, most
        images first, or None for no change; a message). Tags that cannot name a file are left out and named."""
        from bp_trainer.tokens.audit import audit_dataset
        from bp_trainer.train.embeddings import embedding_name, name_problem

        dataset = (dataset or "").strip()
        if not dataset:
            return None, render.message_html("enter a dataset folder first", "warn")
        try:
            report = audit_dataset(dataset, self.host.tokenizer(), pattern=(pattern or "").strip() or None,
                                   flagged_only=True, sort="count")
        except BPError as exc:
            return None, render.error_html(exc)
        tags = [r["tag"] for r in report["tags"]]
        usable = [t for t in tags if name_problem(t) is None]
        if not usable:
            return None, render.message_html("no flagged tag to train as an embedding", "warn")
        text = (f"{len(usable)} flagged tags → Train tab › Tag embeddings (remove the ones you do not want); "
                f"after training, type them in txt2img as: {', '.join(embedding_name(t) for t in usable[:5])}"
                + (" …" if len(usable) > 5 else ""))
        skipped = [t for t in tags if t not in usable]
        if skipped:
            text += f"; left out (not a file name): {', '.join(skipped[:5])}"
        return "\n".join(usable), render.message_html(text, "ok")

    # ------------------------------------------------------------------------------------ rename

    def rename_preview(self, dataset: str, old: str, new: str) -> Dict[Any, Any]:
        """Every caption line that would change (dry run: nothing is written)."""
        from bp_trainer.tokens.rename import plan_rename

        try:
            plan = plan_rename((dataset or "").strip(), old, new).to_dict()
        except BPError as exc:
            return self._preview([], render.error_html(exc))
        rows = [[f["path"] + (f":{ln['line']}" if len(f["lines"]) > 1 else ""), ln["before"], ln["after"]]
                for f in plan["files"] for ln in f["lines"]]
        if not plan["files"]:
            return self._preview([], render.message_html(
                f"no caption of the {plan['captions_scanned']} has the tag '{plan['from']}'", "warn"))
        text = (f"dry run: {plan['files_changed']} of {plan['captions_scanned']} captions would change "
                f"({plan['replacements']} replacements of '{plan['from']}' → '{plan['to']}')")
        if plan["duplicates"]:
            text += f"; {len(plan['duplicates'])} already have '{plan['to']}' (it would appear twice)"
        return self._preview(rows, render.message_html(text, "warn" if plan["duplicates"] else "info"))

    def _preview(self, rows: List[List[Any]], message: str) -> Dict[Any, Any]:
        return {self.out.changes: rows, self.out.rename_msg: message}

    def rename_apply(self, dataset: str, old: str, new: str) -> Dict[Any, str]:
        """The outcome, and the journal path for Undo. Originals are backed up; an interrupted apply is completed."""
        from bp_trainer.tokens.rename import apply_rename

        try:
            result = apply_rename((dataset or "").strip(), old, new)
        except BPError as exc:
            return {self.out.rename_msg: render.error_html(exc), self.out.journal: ""}
        if not result.get("journal"):
            return {self.out.rename_msg: render.message_html(f"nothing to rename: no caption has '{result['from']}'",
                                                             "warn"), self.out.journal: ""}
        text = (f"renamed '{result['from']}' → '{result['to']}' in {result['files_changed']} captions"
                + (" (an interrupted apply was completed)" if result.get("resumed") else ""))
        kind = "ok"
        if result.get("conflicts"):
            text += f"; {len(result['conflicts'])} files changed since the plan were left alone"
            kind = "warn"
        return {self.out.rename_msg: render.message_html(text + ". Undo restores the originals.", kind),
                self.out.journal: str(result["journal"])}

    def rename_undo(self, journal: str) -> Dict[Any, str]:
        """Restore the originals (an interrupted undo is completed by pressing Undo again)."""
        from bp_trainer.tokens.rename import undo_rename

        if not (journal or "").strip():
            return {self.out.rename_msg: render.message_html(
                "no rename to undo (apply one first, or paste a journal path)", "warn")}
        try:
            result = undo_rename(journal.strip())
        except BPError as exc:
            return {self.out.rename_msg: render.error_html(exc)}
        text = f"undone '{result['from']}' → '{result['to']}': {result['restored']} captions restored"
        if result["conflicts"]:
            text += "; left alone: " + "; ".join(f"{c['path']} ({c['reason']})" for c in result["conflicts"][:5])
            return {self.out.rename_msg: render.message_html(text, "warn")}
        return {self.out.rename_msg: render.message_html(text, "ok")}

    # ------------------------------------------------------------------------------------ suggest

    def suggest(self, dataset: str, tag: str, count: Any = 10) -> Dict[Any, Any]:
        """Single-token replacements for a mangled tag, each with its reasons."""
        from bp_trainer.tokens.suggest import suggest_replacements

        if not (tag or "").strip():
            return self._suggest([], render.message_html("enter the tag to replace", "warn"))
        try:
            result = suggest_replacements((dataset or "").strip(), tag.strip(), self.host.tokenizer(),
                                          count=max(1, int(count or 10)))
        except BPError as exc:
            return self._suggest([], render.error_html(exc))
        rows = [[s["text"], s["id"], "; ".join(s.get("reasons") or [])] for s in result["suggestions"]]
        cut = (f"CLIP cuts {_mangled_text(result['mangled'])}" if result["mangled"]
               else "CLIP reads every word of it (not flagged)")
        text = (f"'{result['tag']}' ({result['tag_count']} captions) is {len(result['tag_pieces'])} CLIP pieces: "
                f"{_pieces_text(result['tag_pieces'])}; {cut} — {len(rows)} single-token replacements")
        return self._suggest(rows, render.message_html(text, "info"))

    def _suggest(self, rows: List[List[Any]], message: str) -> Dict[Any, Any]:
        return {self.out.sug_table: rows, self.out.sug_msg: message}

    # ------------------------------------------------------------------------------------ table picks

    @staticmethod
    def _row(rows: Any, index: Any) -> Optional[List[Any]]:
        try:
            r = int(index[0] if isinstance(index, (list, tuple)) else index)
            row = list(rows[r])
        except (TypeError, ValueError, IndexError, KeyError):
            return None
        return row if row and str(row[0]).strip() else None

    def pick_audit_row(self, rows: Any, index: Any, old: str = "", sug_tag: str = "") -> Dict[Any, Any]:
        """A click on an audit row: its tag goes to the rename's "Tag" and the suggestion box (a click on the
        empty table's blank row keeps them)."""
        row = self._row(rows, index)
        return {self.out.old: row[0] if row else old, self.out.sug_tag: row[0] if row else sug_tag}

    def pick_suggestion(self, rows: Any, index: Any, tag: str, old: str = "", new: str = "") -> Dict[Any, Any]:
        """A click on a suggestion: rename the mangled tag to it (preview first)."""
        row = self._row(rows, index)
        return {self.out.old: (tag or "").strip() if row else old, self.out.new: row[0] if row else new}


def build(host: Any, train: Any = None) -> TokensCallbacks:
    import gradio as gr

    dataset_default = ""
    if train is not None and getattr(train, "initial_values", None):
        dataset_default = train.initial_values.get("dataset", "")
    with gr.Column(elem_id="bp_train_tokens"):
        with gr.Row():
            prompt = gr.Textbox(label="Prompt", lines=3, elem_id="bp_train_tok_prompt", scale=5,
                                placeholder="masterpiece, 1girl, (by_sakimichan:1.2), long_hair, ...")
            with gr.Column(scale=1, min_width=160):
                steps = gr.Number(label="Steps (for prompt schedules, 1-150)", value=20, precision=0,
                                  elem_id="bp_train_tok_steps")
                negative = gr.Checkbox(label="Count as a negative prompt", value=False, elem_id="bp_train_tok_negative")
        chips = gr.HTML(render.token_chips_html({"tags": []}), elem_id="bp_train_tok_chips")
        with gr.Accordion("Dataset tags", open=True, elem_id="bp_train_tok_dataset_box"):
            with gr.Row():
                dataset = gr.Textbox(label="Dataset folder to audit", value=dataset_default, elem_id="bp_train_tok_dataset",
                                     scale=4)
                focus = gr.Textbox(label="Focus (regular expression, optional)", elem_id="bp_train_tok_focus", scale=2,
                                   placeholder="^by_")
                only_flagged = gr.Checkbox(label="Only flagged tags (words CLIP cuts apart)", value=False,
                                           elem_id="bp_train_tok_flagged")
                audit = gr.Button("Audit tags", variant="primary", elem_id="bp_train_tok_audit")
            audit_msg = gr.HTML(elem_id="bp_train_tok_audit_msg")
            train_embeddings = gr.Button("Train embeddings for the flagged tags", elem_id="bp_train_tok_embeddings",
                                         visible=_embeddings_field(train) is not None)
            table = gr.Dataframe(headers=AUDIT_HEADERS, value=render.table(AUDIT_HEADERS, []), type="array",
                                 datatype=["str", "number", "str", "number", "str"],
                                 interactive=False, wrap=True, elem_id="bp_train_tok_table",
                                 max_rows=None, height=420, row_count=(0, "dynamic"))
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
            changes = gr.Dataframe(headers=RENAME_HEADERS, value=render.table(RENAME_HEADERS, []), interactive=False,
                                   wrap=True,
                                   elem_id="bp_train_tok_changes",
                                   max_rows=None, height=360, row_count=(0, "dynamic"))
        with gr.Accordion("Suggest single-token replacements", open=False, elem_id="bp_train_tok_suggest_box"):
            with gr.Row():
                sug_tag = gr.Textbox(label="Mangled tag", elem_id="bp_train_tok_sug_tag", placeholder="by_sakimichan")
                sug_n = gr.Number(label="How many", value=12, precision=0, elem_id="bp_train_tok_sug_n")
                suggest = gr.Button("Suggest", elem_id="bp_train_tok_suggest")
            sug_msg = gr.HTML(elem_id="bp_train_tok_sug_msg")
            sug_table = gr.Dataframe(headers=SUGGEST_HEADERS, value=render.table(SUGGEST_HEADERS, []), type="array",
                                     interactive=False, wrap=True,
                                     elem_id="bp_train_tok_sug_table",
                                     max_rows=None, height=360, row_count=(0, "dynamic"))

    out = TokensOutputs(chips=chips, table=table, audit_msg=audit_msg, old=old, new=new, changes=changes,
                        rename_msg=rename_msg, journal=journal, sug_tag=sug_tag, sug_table=sug_table, sug_msg=sug_msg)
    cb = TokensCallbacks(host, out)
    render.not_saved(table, changes, journal, sug_table)
    for event in (prompt.change, steps.change, negative.change):
        event(cb.inspect, [prompt, steps, negative], [chips], show_progress="hidden", queue=False)
    audit.click(cb.audit, [dataset, focus, only_flagged], [table, audit_msg], show_progress="minimal")
    preview.click(cb.rename_preview, [dataset, old, new], [changes, rename_msg], show_progress="minimal")
    apply.click(cb.rename_apply, [dataset, old, new], [rename_msg, journal], show_progress="minimal")
    undo.click(cb.rename_undo, [journal], [rename_msg], show_progress="minimal")
    suggest.click(cb.suggest, [dataset, sug_tag, sug_n], [sug_table, sug_msg], show_progress="minimal")

    def on_audit_select(rows, current_old, current_tag, evt):
        return cb.pick_audit_row(rows, evt.index, current_old, current_tag)

    def on_suggestion_select(rows, tag, current_old, current_new, evt):
        return cb.pick_suggestion(rows, evt.index, tag, current_old, current_new)

    # gradio passes the click through a parameter annotated gr.SelectData; set the annotation as an object
    # (this module's annotations are strings, which gradio would resolve in a namespace without `gr`).
    on_audit_select.__annotations__["evt"] = gr.SelectData
    on_suggestion_select.__annotations__["evt"] = gr.SelectData

    table.select(on_audit_select, [table, old, sug_tag], [old, sug_tag], show_progress="hidden")
    sug_table.select(on_suggestion_select, [sug_table, sug_tag, old, new], [old, new], show_progress="hidden")
    _wire_embeddings_button(gr, cb, train_embeddings, [dataset, focus], audit_msg, train)
    if train is not None and getattr(train, "components", None):
        train.components["dataset"].change(lambda v: v, [train.components["dataset"]], [dataset], queue=False,
                                           show_progress="hidden")
    return cb


def _embeddings_field(train: Any) -> Any:
    """The Train form's tag-embeddings list (None without a Train tab)."""
    return ((getattr(train, "components", None) or {}).get("fields") or {}).get("embeddings.tags")


def _wire_embeddings_button(gr: Any, cb: TokensCallbacks, button: Any, inputs: list, message: Any, train: Any) -> None:
    """The audit's "Train embeddings for the flagged tags" fills the Train form's list, then its YAML box."""
    field = _embeddings_field(train)
    if field is None:
        return

    def fill(dataset, pattern):
        value, text = cb.embeddings_for_flagged(dataset, pattern)
        return (gr.update() if value is None else value), text

    event = button.click(fill, inputs, [field, message], show_progress="minimal")
    sync = getattr(train, "form_to_yaml", None)
    comps = train.components
    if callable(sync):
        form = {"yaml": comps["yaml"], "base": comps["base"], "dataset": comps["dataset"], "arb": comps["arb"],
                **comps["fields"]}
        render.bind(event.then, lambda v: {"yaml": sync(v).get("yaml", gr.update())}, form, {"yaml": comps["yaml"]},
                    show_progress="hidden")
