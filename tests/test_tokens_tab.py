"""The Tokens tab's callbacks answer {output component: value} (no value depends on its position in a list),
and gradio 3.41 delivers each value to its component: the tab built in a real gr.Blocks, its events run
through gradio's own `process_api`."""

from __future__ import annotations

import asyncio

import pytest

gr = pytest.importorskip("gradio")


class Host:
    name = "test"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def tokenizer(self):
        return self._tokenizer


@pytest.fixture
def tab(clip_tokenizer, tmp_path):
    from bp_trainer.dataset.demo import write_demo_dataset
    from bp_trainer.ui import tokens_tab

    write_demo_dataset(tmp_path / "data", count=8, seed=1)
    with gr.Blocks() as blocks:
        cb = tokens_tab.build(Host(clip_tokenizer))
    return blocks, cb, tmp_path / "data"


def run_event(blocks, fn, inputs, event_data=None):
    """Run the event whose function is `fn` (or wraps it) as gradio runs it: {component: value sent}."""
    index = next(i for i, f in enumerate(blocks.fns) if f.fn == fn or getattr(f.fn, "__name__", "") == fn)
    result = asyncio.run(blocks.process_api(fn_index=index, inputs=inputs, state={}, event_data=event_data))
    outputs = [blocks.blocks[i] for i in blocks.dependencies[index]["outputs"]]
    return dict(zip(outputs, result["data"]))


def test_callbacks_answer_by_component(tab):
    blocks, cb, data = tab
    out = cb.audit(str(data))
    assert set(out) == {cb.out.table, cb.out.audit_msg}
    assert isinstance(cb.out.table, gr.Dataframe) and isinstance(cb.out.audit_msg, gr.HTML)
    assert set(cb.inspect("1girl")) == {cb.out.chips}
    assert set(cb.rename_preview(str(data), "solo", "alone")) == {cb.out.changes, cb.out.rename_msg}
    assert set(cb.suggest(str(data), "by_amanogawa_kyousuke", 2)) == {cb.out.sug_table, cb.out.sug_msg}
    assert set(cb.rename_undo("")) == {cb.out.rename_msg}


def test_gradio_delivers_each_value_to_its_component(tab):
    blocks, cb, data = tab
    sent = run_event(blocks, cb.audit, [str(data), "^by_", True])
    table = sent[cb.out.table]["data"]
    assert table and all(row[0].startswith("by_") and "\u2192" in row[4] for row in table)
    assert "flagged" in sent[cb.out.audit_msg]
    sent = run_event(blocks, cb.inspect, ["by_amanogawa_kyousuke, 1girl", 20, False])
    assert "bp-tag-many" in sent[cb.out.chips] and "kyousuke \u2192 k·you·suke" in sent[cb.out.chips]
    # A click on an audit row fills the rename and suggestion boxes; on the empty table's blank row, keeps them.
    click = gr.SelectData(None, {"index": [0, 0], "value": table[0][0]})
    sent = run_event(blocks, "on_audit_select", [{"data": table, "headers": []}, "", ""], click)
    assert sent[cb.out.old] == table[0][0] and sent[cb.out.sug_tag] == table[0][0]
    blank = {"data": [["", "", "", "", ""]], "headers": []}
    sent = run_event(blocks, "on_audit_select", [blank, "kept", "kept too"], gr.SelectData(None, {"index": [0, 0], "value": ""}))
    assert sent[cb.out.old] == "kept" and sent[cb.out.sug_tag] == "kept too"
