"""The Buckets sub-tab: the bucket plan of a dataset for an `arb:` block.

A bar chart of images per bucket, the bucket table (size, aspect, megapixels, images, upscaled, mean
crop), skipped images with reasons, crop statistics and the epoch's step count. The work is the dataset
module's (`scan_dataset`, `plan_buckets`); this only lays it out.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from bp_trainer.errors import BPError
from bp_trainer.ui import render

BUCKET_HEADERS = ["bucket", "aspect", "megapixels", "images", "upscaled", "mean crop"]
SKIP_HEADERS = ["file", "reason"]


class BucketsCallbacks:
    def __init__(self, host: Any):
        self.host = host

    def plan(self, dataset: str, arb_text: str, rule: str = "log", batch_size: Any = 1, caption_ext: str = ".txt",
             progress: Optional[Callable[[float, str], Any]] = None) -> Dict[str, Any]:
        """{summary: HTML, chart: bar chart SVG, table: bucket table, skipped: skipped-images table}."""
        from bp_trainer.buckets import ArbConfig, bucket_table
        from bp_trainer.ui import train_form

        try:
            arb = ArbConfig.from_dict(train_form.parse_arb(arb_text or ""), source="arb")
        except BPError as exc:
            return _failed(exc)
        dataset = (dataset or "").strip()
        if not dataset:
            table = bucket_table(arb)
            rows = [[f"{w}\u00d7{h}", round(a, 3), round(w * h / 1e6, 3), "", "", ""] for w, h, a in table]
            msg = render.message_html(f"{len(rows)} buckets (enter a dataset folder to see how its images fall into them)",
                                      "info")
            chart = render.bar_chart_svg([(f"{w}\u00d7{h}", w * h / 1e6) for w, h, _ in table],
                                         title="bucket size (megapixels)", unit=" MP")
            return {"summary": msg, "chart": chart, "table": render.table(BUCKET_HEADERS, rows),
                    "skipped": render.table(SKIP_HEADERS, [])}
        from bp_trainer.dataset import scan_dataset
        from bp_trainer.dataset.plan import plan_buckets

        def scan_progress(done: int, total: int) -> None:
            if progress is not None and total:
                progress(done / total, f"reading image headers {done}/{total}")

        try:
            scan = scan_dataset(dataset, caption_ext=caption_ext or ".txt", progress=scan_progress)
            plan = plan_buckets(scan.items, arb, rule=rule or "log", problems=scan.problems,
                                batch_size=int(batch_size or 1)).to_dict()
        except BPError as exc:
            return _failed(exc)
        return self.render_plan(plan)

    @staticmethod
    def render_plan(plan: dict) -> Dict[str, Any]:
        details = plan["details"]
        rows = []
        for d in details:
            w, h = d["size"]
            rows.append([f"{w}\u00d7{h}", d["aspect"], round(d["pixels"] / 1e6, 3), d["images"], d["upscaled"],
                         f"{d['mean_crop'] * 100:.1f}%"])
        chart = render.bar_chart_svg([(f"{d['size'][0]}\u00d7{d['size'][1]}", d["images"]) for d in details],
                                     title="images per bucket")
        skipped = [[p.get("path", ""), p.get("reason", "")] for p in plan["skipped"]]
        crop = plan["crop"]
        kv = [
            ("images in buckets", plan["images"]),
            ("buckets used", f"{sum(1 for c in plan['counts'] if c)} of {len(plan['buckets'])}"),
            ("skipped", f"{len(skipped)}" + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(plan["skipped_kinds"].items())) + ")"
                                             if skipped else "")),
            ("upscaled", f"{crop['upscaled']}" + (f" (worst \u00d7{crop['upscale_worst']:.2f}: {crop['upscale_worst_path']})"
                                                   if crop.get("upscale_worst_path") else "")),
            ("area cropped", f"mean {crop['mean'] * 100:.1f}%, worst {crop['worst'] * 100:.1f}%"
             + (f" ({crop['worst_path']})" if crop.get("worst_path") else "")),
            ("largest bucket", f"{max(plan['pixels']) / 1e6:.2f} MP (VRAM grows with it)" if plan["pixels"] else "-"),
        ]
        ep = plan.get("epoch")
        if ep:
            kv.append(("steps per epoch", f"{ep['steps_per_epoch']} at batch size {ep['batch_size']} "
                                          f"({ep['leftover_batches']} leftover batches, {ep['leftover']})"))
        return {"summary": render.kv_table_html(kv, cls="bp-kv bp-plan-summary"), "chart": chart,
                "table": render.table(BUCKET_HEADERS, rows), "skipped": render.table(SKIP_HEADERS, skipped)}


def _failed(exc: BPError) -> Dict[str, Any]:
    return {"summary": render.error_html(exc), "chart": "", "table": render.table(BUCKET_HEADERS, []),
            "skipped": render.table(SKIP_HEADERS, [])}


def build(host: Any, train: Any = None) -> BucketsCallbacks:
    import gradio as gr

    cb = BucketsCallbacks(host)
    init = getattr(train, "initial_values", None) or {}
    with gr.Column(elem_id="bp_train_buckets"):
        with gr.Row():
            dataset = gr.Textbox(label="Dataset folder to plan", value=init.get("dataset", ""), elem_id="bp_train_bk_dataset",
                                 scale=4)
            rule = gr.Radio(label="Assignment", choices=["log", "linear"], value="log", elem_id="bp_train_bk_rule",
                            info="nearest aspect ratio in log space (symmetric), or naifu's linear rule")
            batch = gr.Number(label="Batch size (steps per epoch)", value=1, precision=0, elem_id="bp_train_bk_batch")
            ext = gr.Textbox(label="Caption extension", value=".txt", elem_id="bp_train_bk_ext")
        with gr.Row():
            with gr.Column(scale=2):
                arb = gr.Code(label="arb: block", value=init.get("arb", ""), language="yaml", elem_id="bp_train_bk_arb",
                              lines=9)
                plan_btn = gr.Button("Plan buckets", variant="primary", elem_id="bp_train_bk_plan")
                summary = gr.HTML(elem_id="bp_train_bk_summary")
            with gr.Column(scale=3):
                chart = gr.HTML(elem_id="bp_train_bk_chart")
        table = gr.Dataframe(headers=BUCKET_HEADERS, value=render.table(BUCKET_HEADERS, []), interactive=False,
                             elem_id="bp_train_bk_table", max_rows=None, height=420, row_count=(0, "dynamic"))
        with gr.Accordion("Skipped images", open=True, elem_id="bp_train_bk_skipped_box"):
            skipped = gr.Dataframe(headers=SKIP_HEADERS, value=render.table(SKIP_HEADERS, []), interactive=False,
                                   wrap=True, elem_id="bp_train_bk_skipped", max_rows=None, height=420,
                                   row_count=(0, "dynamic"))

    render.not_saved(table, skipped)

    def run(v: Dict[str, Any]):
        from bp_trainer.ui.progress import stream_progress

        yield from stream_progress(
            lambda progress: cb.plan(v["dataset"], v["arb"], v["rule"], v["batch"], v["ext"], progress=progress),
            lambda f, text: {"summary": render.task_progress_html(f, text)})

    render.bind(plan_btn.click, run, {"dataset": dataset, "arb": arb, "rule": rule, "batch": batch, "ext": ext},
                {"summary": summary, "chart": chart, "table": table, "skipped": skipped}, show_progress="hidden")
    comps = getattr(train, "components", None)
    if comps:
        comps["dataset"].change(lambda v: v, [comps["dataset"]], [dataset], queue=False, show_progress="hidden")
        comps["arb"].change(lambda v: v, [comps["arb"]], [arb], queue=False, show_progress="hidden")
    return cb
