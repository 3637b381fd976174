"""Pure HTML/SVG rendering for the tab: token chips, bar chart, loss curve, progress bar, messages, tables; and the
one way every sub-tab wires its callbacks to gradio (`bind`, `on_page_load`).

Rendering takes plain data (dicts/lists from the core modules) and returns a string, so it is tested without gradio
or a browser. Colours come from CSS classes in `style.css` (readable in light and dark themes); nothing here depends
on the WebUI.

Wiring: a sub-tab's callbacks take `{input name: value}` and return `{output name: value}` (plain values, or
`change(...)` for other properties such as `interactive` or `choices`); `bind(event, fn, inputs, outputs)` turns
that into gradio's `{component: value}` with inputs and outputs given as `{name: component}`. An output left out of
the result keeps its value, and reordering components never shifts values.
"""

from __future__ import annotations

import html
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

# Number of distinct chip colours defined in style.css (.bp-chip-c0 … .bp-chip-c7).
CHIP_COLOURS = 8


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def not_saved(*components: Any) -> None:
    """Keep volatile components (logs, outputs, model lists) out of the WebUI's ui-config.json.

    The WebUI stores every labelled component's value and restores it at start-up; a stale log or a model
    name that no longer exists should not come back. Other hosts ignore the attribute.
    """
    for c in components:
        c.do_not_save_to_config = True


def message_html(text: str, kind: str = "info") -> str:
    """A one-line notice (kind: info, ok, warn, error)."""
    return f'<div class="bp-msg bp-msg-{esc(kind)}">{esc(text)}</div>'


def error_html(exc: BaseException) -> str:
    return message_html(str(exc) or type(exc).__name__, "error")


# --------------------------------------------------------------------------------------------- tokens


def _piece_text(piece: str) -> str:
    """A CLIP BPE piece as the user reads it (byte-level characters decoded; `</w>` handled by CSS)."""
    try:
        from bp_trainer.tokens.tokenizer import readable_piece

        return readable_piece(piece).rstrip(" ")
    except ImportError:  # pragma: no cover - the tokens package ships with the UI
        return piece[:-4] if piece.endswith("</w>") else piece


def _flagged(tag: Mapping[str, Any]) -> bool:
    """The tokens module's "mangled" verdict when the tag has one (bp_trainer.tokens.mangled); an embedding's
    vectors are no split tag."""
    if tag.get("embeddings"):
        return False
    if "mangled" in tag:
        return bool(tag["mangled"])
    return len(tag.get("pieces") or []) >= 3


def _chip_runs(pieces: Sequence[str], ids: Sequence[Any]) -> list[tuple[int, str, int]]:
    """(first index, piece, vectors) per chip: the vectors of a textual-inversion embedding (its `<name>` pieces of
    id 0 in a row) are one chip; any other piece is a chip of its own (vectors 0)."""
    out: list[tuple[int, str, int]] = []
    for j, piece in enumerate(pieces):
        vector = piece.startswith("<") and piece.endswith(">") and j < len(ids) and ids[j] == 0
        if vector and out and out[-1][1] == piece and out[-1][2]:
            out[-1] = (out[-1][0], piece, out[-1][2] + 1)
        else:
            out.append((j, piece, 1 if vector else 0))
    return out


def token_chips_html(inspection: Mapping[str, Any]) -> str:
    """Render a prompt inspection (see `bp_trainer.tokens`) as coloured chips.

    Expected shape (plain dicts): `count`, `limit`, `tags` (each `text`, `weight`, `pieces`, `ids`, and
    optionally `chunk` (index of the 75-token chunk it starts in) and `start` (token position)), and
    `chunks` (a list; its length is the number of chunks; an item may be a dict with `tokens`/`count`).
    One chip group per tag, one chip per CLIP piece; tags with words CLIP cuts apart (`mangled`; without it:
    tags of 3+ pieces) are flagged; a chunk boundary is
    drawn where a tag starts a new chunk. Hovering a chip shows its id and position (CSS `data-tip`).
    """
    tags: Sequence[Mapping[str, Any]] = list(inspection.get("tags") or [])
    count = inspection.get("count")
    limit = inspection.get("limit")
    chunks = inspection.get("chunks") or []
    n_chunks = len(chunks) if isinstance(chunks, (list, tuple)) else int(chunks or 0)
    parts: list[str] = []
    head = []
    if count is not None:
        head.append(f'<span class="bp-count" id="bp_train_token_count">{esc(count)}/{esc(limit if limit is not None else 75)}</span>')
    head.append(f"<span>{len(tags)} tag{'s' if len(tags) != 1 else ''}</span>")
    if n_chunks:
        head.append(f"<span>{n_chunks} chunk{'s' if n_chunks != 1 else ''} of 75</span>")
    multi = sum(1 for t in tags if _flagged(t))
    if multi:
        head.append(f'<span class="bp-warn-text">{multi} tag{"s" if multi != 1 else ""} with words CLIP cuts apart</span>')
    parts.append('<div class="bp-token-head">' + " · ".join(head) + "</div>")
    parts.append('<div class="bp-chips">')
    last_chunk = 0
    position = -1
    for i, tag in enumerate(tags):
        chunk = tag.get("chunk")
        if chunk is not None and int(chunk) > last_chunk:
            last_chunk = int(chunk)
            parts.append(f'<span class="bp-chunk-break" title="chunk {last_chunk + 1} starts here">chunk {last_chunk + 1}</span>')
        pieces = list(tag.get("pieces") or [])
        ids = list(tag.get("ids") or [])
        weight = tag.get("weight")
        n = len(pieces)
        cls = "bp-tag"
        if _flagged(tag):
            cls += " bp-tag-many"
        tip = f"{tag.get('text', '')} — {n} token{'s' if n != 1 else ''}"
        tip += "".join(f"; {m['shown']}" for m in tag.get("mangled") or [])
        if weight not in (None, 1, 1.0):
            tip += f", weight {float(weight):g}"
        parts.append(f'<span class="{cls}" title="{esc(tip)}" data-tag="{esc(tag.get("text", ""))}">')
        parts.append(f'<span class="bp-tag-count">{n}</span>')
        start = tag.get("start")
        for j, piece, run in _chip_runs(pieces, ids):
            tid = ids[j] if j < len(ids) else ""
            pos = f", position {int(start) + j + 1}" if start is not None else ""
            position += 1
            colour = position % CHIP_COLOURS  # neighbours always differ
            if run:  # a textual-inversion embedding: one chip for its vectors
                parts.append(f'<span class="bp-chip bp-chip-c{colour} bp-chip-end bp-chip-embedding" '
                             f'data-tip="embedding {esc(piece)} · {run} vectors{esc(pos)}" data-id="{esc(piece)}">'
                             f'{esc(piece)} ×{run}</span>')
                continue
            end = " bp-chip-end" if piece.endswith("</w>") else ""
            parts.append(
                f'<span class="bp-chip bp-chip-c{colour}{end}" data-tip="{esc(piece)} · id {esc(tid)}{esc(pos)}" '
                f'data-id="{esc(tid)}">{esc(_piece_text(piece))}</span>'
            )
        if weight not in (None, 1, 1.0):
            parts.append(f'<span class="bp-tag-weight">×{float(weight):g}</span>')
        parts.append("</span>")
    if not tags:
        parts.append('<span class="bp-muted">(empty prompt)</span>')
    parts.append("</div>")
    return '<div class="bp-tokens">' + "".join(parts) + "</div>"


# --------------------------------------------------------------------------------------------- charts


def bar_chart_svg(items: Sequence[tuple[str, float]], *, title: str = "", unit: str = "", width: int = 720,
                  bar_height: int = 18, label_width: int = 110) -> str:
    """Horizontal bar chart as inline SVG: one bar per (label, value), value printed at the bar's end."""
    items = list(items)
    if not items:
        return message_html("nothing to chart", "info")
    top = 24 if title else 4
    height = top + len(items) * (bar_height + 4) + 4
    vmax = max((float(v) for _, v in items), default=0.0) or 1.0
    span = width - label_width - 60
    rows = []
    for k, (label, value) in enumerate(items):
        y = top + k * (bar_height + 4)
        w = max(0.0, float(value)) / vmax * span
        rows.append(
            f'<g class="bp-bar-row"><title>{esc(label)}: {esc(_num(value))}{esc(unit)}</title>'
            f'<text class="bp-svg-label" x="{label_width - 6}" y="{y + bar_height * 0.72:.1f}" text-anchor="end">{esc(label)}</text>'
            f'<rect class="bp-bar" x="{label_width}" y="{y}" width="{w:.1f}" height="{bar_height}" rx="3"></rect>'
            f'<text class="bp-svg-value" x="{label_width + w + 5:.1f}" y="{y + bar_height * 0.72:.1f}">{esc(_num(value))}</text></g>'
        )
    head = f'<text class="bp-svg-title" x="4" y="16">{esc(title)}</text>' if title else ""
    return (f'<svg class="bp-chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
            f'aria-label="{esc(title or "bar chart")}" xmlns="http://www.w3.org/2000/svg">{head}{"".join(rows)}</svg>')


def _num(v: Any) -> str:
    f = float(v)
    if f == int(f) and abs(f) < 1e15:
        return str(int(f))
    if abs(f) >= 100:
        return f"{f:.0f}"
    return f"{f:.4g}"


def smooth(values: Sequence[float], alpha: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values):
        avg = alpha * avg + (1 - alpha) * float(v)
        out.append(avg / (1 - alpha ** (i + 1)))
    return out


def line_chart_svg(points: Sequence[tuple[float, float]], *, title: str = "loss", width: int = 720, height: int = 220,
                   smoothing: float = 0.9, max_points: int = 600) -> str:
    """Line chart (raw values faint, smoothed line bold) as inline SVG. Downsamples to `max_points`."""
    pts = [(float(x), float(y)) for x, y in points if y is not None and math.isfinite(float(y))]
    if not pts:
        return f'<div class="bp-chart-empty">{esc(title)}: no data yet</div>'
    if len(pts) > max_points:
        step = len(pts) / max_points
        pts = [pts[int(i * step)] for i in range(max_points)] + [pts[-1]]
    xs = [p[0] for p in pts]
    ys = [p[1] for p in pts]
    sm = smooth(ys, smoothing) if len(ys) > 2 else ys
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + (abs(y0) or 1) * 0.1
        y0 = y0 - (abs(y0) or 1) * 0.1
    left, right, top, bottom = 56, 12, 24, 26
    pw, ph = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    raw = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
    smo = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, sm))
    grid = []
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        yy = sy(yv)
        grid.append(f'<line class="bp-grid" x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}"></line>'
                    f'<text class="bp-svg-label" x="{left - 6}" y="{yy + 4:.1f}" text-anchor="end">{esc(_num(round(yv, 4)))}</text>')
    xticks = (f'<text class="bp-svg-label" x="{left}" y="{height - 8}">{esc(_num(x0))}</text>'
              f'<text class="bp-svg-label" x="{left + pw}" y="{height - 8}" text-anchor="end">step {esc(_num(x1))}</text>')
    last = f"{title}: {_num(ys[-1])} (smoothed {_num(sm[-1])})"
    return (f'<svg class="bp-chart bp-line-chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
            f'aria-label="{esc(title)} curve" xmlns="http://www.w3.org/2000/svg">'
            f'<text class="bp-svg-title" x="4" y="16">{esc(last)}</text>{"".join(grid)}{xticks}'
            f'<polyline class="bp-line-raw" points="{raw}"></polyline>'
            f'<polyline class="bp-line" points="{smo}"></polyline></svg>')


# --------------------------------------------------------------------------------------------- progress


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(float(seconds)) or seconds < 0:
        return "–"
    s = int(round(float(seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_html(view: Mapping[str, Any]) -> str:
    """Progress bar with step/total, epoch, ETA, speed and status, from a `RunView.summary()` dict."""
    status = str(view.get("status") or "idle")
    step = view.get("step") or 0
    total = view.get("total_steps")
    frac = min(1.0, step / total) if total else (1.0 if status == "done" else 0.0)
    pct = f"{frac * 100:.1f}%"
    bits = []
    if view.get("preparing") and status == "starting":
        bits.append(str(view["preparing"]))
    if total:
        bits.append(f"step {step}/{total}")
    elif step:
        bits.append(f"step {step}")
    done = view.get("epochs_done")
    if done is not None:  # a max_steps run shows its steps only
        bits.append(f"{done}/{view['total_epochs']} epochs" if view.get("total_epochs") else f"{done} epochs done")
    if view.get("loss") is not None:
        bits.append(f"loss {_num(view['loss'])}")
    if view.get("ips"):
        bits.append(f"{float(view['ips']):.2f} img/s")
    if status == "running":
        bits.append(f"ETA {format_duration(view.get('eta'))}")
    if view.get("elapsed") is not None:
        bits.append(f"elapsed {format_duration(view.get('elapsed'))}")
    label = {"running": "Training", "stopping": "Stopping…", "done": "Finished", "stopped": "Stopped",
             "error": "Failed", "idle": "No run", "starting": "Starting…", "exited": "Ended"}.get(status, status)
    run = view.get("run_name")
    head = f'<span class="bp-status bp-status-{esc(status)}" id="bp_train_status_label">{esc(label)}</span>'
    if run:
        head += f' <span class="bp-muted">{esc(run)}</span>'
    gpu = view.get("gpu_note")
    note = f'<div class="bp-gpu-note">{esc(gpu)}</div>' if gpu else ""
    err = view.get("error")
    err_html = message_html(err, "error") if err else ""
    names = view.get("embeddings") or []
    emb = (f'<div class="bp-progress-embeddings">tag embeddings written: {esc(", ".join(names))}</div>'
           if names else "")
    return (f'<div class="bp-progress" data-status="{esc(status)}">'
            f'<div class="bp-progress-head">{head}</div>'
            f'<div class="bp-progress-track"><div class="bp-progress-fill" style="width:{pct}"></div>'
            f'<span class="bp-progress-pct">{pct}</span></div>'
            f'<div class="bp-progress-info">{esc(" · ".join(bits))}</div>{emb}{note}{err_html}</div>')


def task_progress_html(fraction: float, text: str) -> str:
    """A small progress bar for work done in a request (a scan, a merge)."""
    pct = f"{max(0.0, min(1.0, float(fraction))) * 100:.0f}%"
    return (f'<div class="bp-progress bp-task" data-status="running"><div class="bp-progress-track">'
            f'<div class="bp-progress-fill" style="width:{pct}"></div><span class="bp-progress-pct">{pct}</span></div>'
            f'<div class="bp-progress-info">{esc(text)}</div></div>')


def kv_table_html(rows: Iterable[tuple[str, Any]], *, cls: str = "bp-kv") -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<table class="{esc(cls)}">{body}</table>'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> dict:
    """A `gr.Dataframe` value that shows its named headers even with no rows (a plain `[]` shows "1 2 3 …")."""
    return {"headers": list(headers), "data": [list(r) for r in rows]}


# --------------------------------------------------------------------------------------------- wiring


@dataclass(frozen=True)
class Change:
    """New properties for a component (what `gr.update(**props)` sends), from callbacks that never import gradio."""

    props: Mapping[str, Any]


def change(**props: Any) -> Change:
    return Change(dict(props))


def component_values(outputs: Mapping[str, Any], values: Mapping[str, Any]) -> dict:
    """A callback's `{name: value}` as gradio's `{component: value}` (outputs left out keep their value)."""
    import gradio as gr

    unknown = sorted(set(values) - set(outputs))
    if unknown:
        raise KeyError(f"not an output of this event: {', '.join(unknown)}")
    result = {outputs[name]: gr.update(**v.props) if isinstance(v, Change) else v for name, v in values.items()}
    return result or {c: gr.update() for c in outputs.values()}  # gradio reads an empty dict as a value list


def bind(event: Callable[..., Any], fn: Callable[[dict], Any], inputs: Optional[Mapping[str, Any]],
         outputs: Mapping[str, Any], **kwargs: Any) -> Any:
    """Wire `fn({input name: value}) -> {output name: value}` to a gradio event listener (`button.click`,
    `blocks.load`, ...); `inputs`/`outputs` are `{name: component}`. A generator `fn` streams: each yield is such a
    dict. Returns the event's dependency (for `.then`)."""
    names = list(inputs or {})
    components = [inputs[n] for n in names] if inputs else None
    if inspect.isgeneratorfunction(fn):
        def handler(*args: Any) -> Any:
            for values in fn(dict(zip(names, args))):
                yield component_values(outputs, values)
    else:
        def handler(*args: Any) -> Any:
            return component_values(outputs, fn(dict(zip(names, args))))
    return event(handler, components, list(outputs.values()), **kwargs)


def on_page_load(fn: Callable[[dict], Any], inputs: Optional[Mapping[str, Any]], outputs: Mapping[str, Any],
                 **kwargs: Any) -> Any:
    """`bind` to every page load (a reload included) of the gr.Blocks being built, the way gradio attaches a
    component's callable value. Call it while the tab is built; inside the WebUI the tab's Blocks is rendered into
    the WebUI's page and its load events run there."""
    from gradio.context import Context

    root = Context.root_block
    if root is None:
        raise RuntimeError("on_page_load is called while a gr.Blocks is being built")
    kwargs.setdefault("show_progress", "hidden")
    return bind(root.load, fn, inputs, outputs, **kwargs)


# --------------------------------------------------------------------------------------------- validation


def loss_chart_svg(train: Sequence[tuple[float, float]], validation: Sequence[tuple[float, float]] = (),
                   best_step: float | None = None, *, width: int = 720, height: int = 220,
                   max_points: int = 600) -> str:
    """The training loss (raw faint, smoothed bold) with the validation loss over it (dots joined by a line)
    and the best validation step marked by a vertical line; without validation points, `line_chart_svg`."""
    val = [(float(x), float(y)) for x, y in validation if y is not None and math.isfinite(float(y))]
    if not val:
        return line_chart_svg(train, title="loss", width=width, height=height, max_points=max_points)
    pts = [(float(x), float(y)) for x, y in train if y is not None and math.isfinite(float(y))]
    if len(pts) > max_points:
        pts = [pts[int(i * len(pts) / max_points)] for i in range(max_points)] + [pts[-1]]
    frame = _Frame.around(pts + val, width, height)
    sm = smooth([y for _, y in pts]) if len(pts) > 2 else [y for _, y in pts]
    parts = [frame.axes()]
    if pts:
        smoothed = [(x, y) for (x, _), y in zip(pts, sm)]
        parts.append(f'<polyline class="bp-line-raw" points="{frame.points(pts)}"></polyline>'
                     f'<polyline class="bp-line" points="{frame.points(smoothed)}"></polyline>')
    parts.append(f'<polyline class="bp-line-val" points="{frame.points(val)}"></polyline>')
    parts.extend(f'<circle class="bp-val-dot" cx="{frame.sx(x):.1f}" cy="{frame.sy(y):.1f}" r="3">'
                 f'<title>step {esc(_num(x))}: validation {esc(_num(y))}</title></circle>' for x, y in val)
    title = f"validation {_num(val[-1][1])}"
    if best_step is not None:
        best = next((y for x, y in val if x == float(best_step)), None)
        bx = frame.sx(float(best_step))
        parts.append(f'<line class="bp-best" x1="{bx:.1f}" x2="{bx:.1f}" y1="{frame.top}" y2="{frame.bottom}">'
                     f'<title>best validation loss at step {esc(_num(best_step))}</title></line>')
        title += f" · best {_num(best) if best is not None else '–'} at step {_num(best_step)}"
    if pts:
        title = f"loss {_num(pts[-1][1])} (smoothed {_num(sm[-1])}) · {title}"
    return (f'<svg class="bp-chart bp-line-chart" viewBox="0 0 {width} {height}" width="100%" role="img" '
            f'aria-label="training and validation loss" data-best-step="{esc("" if best_step is None else best_step)}" '
            f'xmlns="http://www.w3.org/2000/svg"><text class="bp-svg-title" x="4" y="16">{esc(title)}</text>'
            f'{"".join(parts)}</svg>')


class _Frame:
    """Data -> SVG coordinates of a chart's plot area."""

    def __init__(self, x0: float, x1: float, y0: float, y1: float, width: int, height: int):
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1
        self.left, self.right, self.top, self.bottom = 56, width - 12, 24, height - 26
        self.height = height

    @classmethod
    def around(cls, pts: Sequence[tuple[float, float]], width: int, height: int) -> "_Frame":
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        pad = (abs(y0) or 1) * 0.1 if y1 == y0 else 0.0
        return cls(x0, x1 if x1 > x0 else x0 + 1, y0 - pad, y1 + pad, width, height)

    def sx(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * (self.right - self.left)

    def sy(self, y: float) -> float:
        return self.top + (1 - (y - self.y0) / (self.y1 - self.y0)) * (self.bottom - self.top)

    def points(self, pts: Sequence[tuple[float, float]]) -> str:
        return " ".join(f"{self.sx(x):.1f},{self.sy(y):.1f}" for x, y in pts)

    def axes(self) -> str:
        out = []
        for k in range(5):
            yv = self.y0 + (self.y1 - self.y0) * k / 4
            yy = self.sy(yv)
            out.append(f'<line class="bp-grid" x1="{self.left}" x2="{self.right}" y1="{yy:.1f}" y2="{yy:.1f}"></line>'
                       f'<text class="bp-svg-label" x="{self.left - 6}" y="{yy + 4:.1f}" text-anchor="end">'
                       f'{esc(_num(round(yv, 4)))}</text>')
        out.append(f'<text class="bp-svg-label" x="{self.left}" y="{self.height - 8}">{esc(_num(self.x0))}</text>'
                   f'<text class="bp-svg-label" x="{self.right}" y="{self.height - 8}" text-anchor="end">'
                   f'step {esc(_num(self.x1))}</text>')
        return "".join(out)


def sample_grid_update(grid: Any) -> dict:
    """The gallery's value for a `RunView.SampleGrid`: its cells row by row (step x prompt), as many columns as
    the grid has. The dict is what `gr.update(value=..., columns=..., label=...)` returns in gradio 3.41 (gradio
    maps `columns` to the gallery's own property); an empty grid empties the gallery."""
    cols = max(1, len(grid.columns))
    return {"__type__": "generic_update", "value": grid.gallery(), "columns": cols,
            "label": f"Samples per save: rows are steps (newest first), columns {' | '.join(grid.columns)}"
            if grid.rows else "Samples per save"}
