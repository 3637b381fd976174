"""The Merge sub-tab: assemble one checkpoint from parts into the host's checkpoint folder.

Base checkpoint, an optional UNet/EMA source, VAE (from the host's VAE list), text encoder, precision,
drop EMA, output name -> `host.checkpoint_dir()/NAME`, both WebUI hashes shown, the model list refreshed.
The work (streaming, atomic write, never overwriting an input) is the checkpoint module's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple

from bp_trainer.errors import BPError
from bp_trainer.ui import render

NONE = ""  # dropdown entry meaning "not used"


def output_path(checkpoint_dir: str, name: str, fmt: str) -> Path:
    """CKPT_DIR/NAME with the format's extension; a name may not leave the folder, and must fit the file
    system (`fsutil.check_output_path`)."""
    from bp_trainer.fsutil import check_output_path

    name = (name or "").strip()
    if not name:
        raise BPError("enter an output name", hint="e.g. my-model-fp16")
    ext = ".ckpt" if fmt == "ckpt" else ".safetensors"
    base = os.path.basename(name)
    if base != name or name in (".", ".."):
        raise BPError(f"the output name '{name}' must be a plain file name (it is written into the checkpoint folder)")
    if not base.lower().endswith(ext):
        for other in (".safetensors", ".ckpt"):
            if base.lower().endswith(other):
                base = base[: -len(other)]
        base += ext
    return check_output_path(Path(checkpoint_dir) / base)


class MergeCallbacks:
    def __init__(self, host: Any):
        self.host = host

    def choices(self) -> Tuple[List[str], List[str]]:
        return list(self.host.list_checkpoints()), list(self.host.list_vaes())

    def refresh(self) -> Tuple[List[str], List[str]]:
        self.host.refresh_models()
        return self.choices()

    def _ckpt(self, name: str) -> Optional[str]:
        return self.host.checkpoint_path(name) if name else None

    def options(self, base: str, unet: str = NONE, use_ema: bool = False, vae: str = NONE, text_encoder: str = NONE,
                precision: str = "fp16", drop_ema: bool = True, fmt: str = "safetensors"):
        """The checkpoint module's MergeOptions for the form (names resolved through the host)."""
        from bp_trainer.checkpoint.assemble import MergeOptions

        if not base:
            raise BPError("choose a base checkpoint")
        return MergeOptions(base=self._ckpt(base), unet=self._ckpt(unet) if unet else None, use_ema=bool(use_ema),
                            vae=self.host.vae_path(vae) if vae else None,
                            text_encoder=self._ckpt(text_encoder) if text_encoder else None, drop_ema=bool(drop_ema),
                            precision=precision or "fp16", fmt=fmt or "safetensors",
                            extra_metadata={"bp_merged_by": "BP Train (Merge tab)"})

    def merge(self, base: str, unet: str = NONE, use_ema: bool = False, vae: str = NONE, text_encoder: str = NONE,
              precision: str = "fp16", drop_ema: bool = True, name: str = "", fmt: str = "safetensors",
              overwrite: bool = False, progress: Optional[Callable[[float, str], Any]] = None) -> str:
        """Run the merge; an HTML report (output, hashes, tensors, size) or the error.

        The merge runs in a worker thread while this thread reports progress: the bytes written to the
        atomic writer's temporary file against the planned output size (from the merge plan's shapes/dtypes).
        """
        from bp_trainer.checkpoint import assemble

        try:
            out = output_path(self.host.checkpoint_dir(), name, fmt)
            if out.exists() and not overwrite:
                raise BPError("the output file exists", path=out, hint="choose another name or tick 'Overwrite'")
            opts = self.options(base, unet, use_ema, vae, text_encoder, precision, drop_ema, fmt)
            total = planned_bytes(opts)  # also checks that the parts fit, before anything is written
            result = _run_with_progress(lambda: assemble.merge(opts, out), out, total, progress)
        except BPError as exc:
            return render.error_html(exc)
        self.host.refresh_models()
        return self.report(result, out)

    @staticmethod
    def report(result: Any, out: Path) -> str:
        r = result if isinstance(result, dict) else getattr(result, "__dict__", {})
        size = r.get("bytes")
        rows = [
            ("output", r.get("out") or str(out)),
            ("sha256", r.get("sha256", "")),
            ("AutoV2 (Model hash)", r.get("autov2", "")),
            ("old hash", r.get("old", "")),
            ("tensors", r.get("tensors", "")),
            ("size", f"{size / 1e6:.1f} MB" if isinstance(size, (int, float)) else ""),
        ]
        return (render.message_html(f"written {Path(r.get('out') or out).name}; it is in the checkpoint list now", "ok")
                + render.kv_table_html([(k, v) for k, v in rows if v not in ("", None)], cls="bp-kv bp-hash"))


def planned_bytes(opts: Any) -> int:
    """Tensor bytes the merge will write (from the plan's final shapes and dtypes; nothing is read)."""
    from bp_trainer.checkpoint.assemble import plan_merge

    entries, _recipe, views = plan_merge(opts)
    try:
        total = 0
        for e in entries:
            n = 1
            for d in e.shape:
                n *= int(d)
            total += n * e.dtype.itemsize
        return total
    finally:
        for v in views:
            v.close()


def _run_with_progress(work: Callable[[], Any], out: Path, total: int,
                       progress: Optional[Callable[[float, str], Any]], interval: float = 0.25) -> Any:
    """Run `work` in a thread; report the growth of OUT's temporary file (`fsutil.partial_files`) as progress."""
    import threading

    from bp_trainer.fsutil import partial_files

    box: dict = {}

    def target() -> None:
        try:
            box["result"] = work()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, name="bp-train-merge", daemon=True)
    t.start()
    written = 0
    while t.is_alive():
        t.join(interval)
        if progress is not None and total > 0 and t.is_alive():
            for tmp in partial_files(out):
                try:
                    written = max(written, tmp.stat().st_size)
                except OSError:
                    pass
            progress(min(0.99, written / total), f"writing {out.name}: {written / 1e6:.0f} of ~{total / 1e6:.0f} MB")
    if "error" in box:
        raise box["error"]
    if progress is not None:
        progress(1.0, f"written {out.name}")
    return box["result"]


def build(host: Any) -> MergeCallbacks:
    import gradio as gr

    cb = MergeCallbacks(host)
    ckpts, vaes = cb.choices()
    with gr.Column(elem_id="bp_train_merge"):
        with gr.Row():
            base = gr.Dropdown(label="Base checkpoint", choices=ckpts, value=ckpts[0] if ckpts else None,
                               elem_id="bp_train_mg_base", scale=4)
            refresh = gr.Button("\u21bb", elem_id="bp_train_mg_refresh", elem_classes=["bp-icon-btn"], scale=0,
                                min_width=40)
        with gr.Row():
            unet = gr.Dropdown(label="UNet from (optional: a UNet-only file or another checkpoint)", choices=[NONE, *ckpts],
                               value=NONE, allow_custom_value=True, elem_id="bp_train_mg_unet")
            use_ema = gr.Checkbox(label="Use EMA weights as the UNet", value=False, elem_id="bp_train_mg_use_ema")
        with gr.Row():
            vae = gr.Dropdown(label="VAE (optional)", choices=[NONE, *vaes], value=NONE, allow_custom_value=True,
                              elem_id="bp_train_mg_vae")
            te = gr.Dropdown(label="Text encoder from (optional)", choices=[NONE, *ckpts], value=NONE,
                             allow_custom_value=True, elem_id="bp_train_mg_te")
        with gr.Row():
            precision = gr.Radio(label="Precision", choices=["fp16", "bf16", "fp32"], value="fp16",
                                 elem_id="bp_train_mg_precision")
            drop_ema = gr.Checkbox(label="Drop EMA weights", value=True, elem_id="bp_train_mg_drop_ema")
            fmt = gr.Radio(label="Format", choices=["safetensors", "ckpt"], value="safetensors", elem_id="bp_train_mg_fmt")
        with gr.Row():
            name = gr.Textbox(label="Output name (written into the checkpoint folder)", elem_id="bp_train_mg_name",
                              placeholder="my-model-fp16", scale=4)
            overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id="bp_train_mg_overwrite")
            go = gr.Button("Merge", variant="primary", elem_id="bp_train_mg_go")
        result = gr.HTML(elem_id="bp_train_mg_result")

    render.not_saved(base, unet, vae, te, result)
    # MergeCallbacks.merge's keyword -> its field; gradio passes the values as {component: value}
    form = {"base": base, "unet": unet, "use_ema": use_ema, "vae": vae, "text_encoder": te, "precision": precision,
            "drop_ema": drop_ema, "name": name, "fmt": fmt, "overwrite": overwrite}

    def do_refresh():
        c, v = cb.refresh()
        return {base: gr.update(choices=c), unet: gr.update(choices=[NONE, *c]), vae: gr.update(choices=[NONE, *v]),
                te: gr.update(choices=[NONE, *c])}

    def do_merge(values):
        from bp_trainer.ui.progress import stream_progress

        kwargs = {key: values[field] for key, field in form.items()}
        for html in stream_progress(lambda progress: cb.merge(**kwargs, progress=progress), render.task_progress_html):
            yield {result: html}

    lists = [base, unet, vae, te]
    refresh.click(do_refresh, None, lists, show_progress="hidden")
    go.click(do_merge, set(form.values()), [result], show_progress="hidden").then(do_refresh, None, lists,
                                                                                   show_progress="hidden")
    # a reloaded page lists the models there are now, not the ones of the WebUI's start
    names = {"base": base, "unet": unet, "vae": vae, "te": te}
    render.on_page_load(lambda _: {name: do_refresh()[comp] for name, comp in names.items()}, None, names)
    return cb
