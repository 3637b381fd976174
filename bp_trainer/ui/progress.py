"""Long UI work with a live progress bar (`stream_progress`). (A run's progress view is the core's
`bp_trainer.run_view.RunView`.)"""

from __future__ import annotations

import threading
from typing import Any, Callable, Iterator



def stream_progress(work: Callable[[Callable[..., None]], Any], render_progress: Callable[[float, str], Any],
                    interval: float = 0.3) -> Iterator[Any]:
    """Run `work(progress)` in a thread; yield `render_progress(fraction, text)` while it runs, then its result.

    Gradio streams a generator's yields to the page, so long work (a dataset scan, a merge) shows a live
    progress bar without `gr.Progress`, which would make the WebUI refuse to start under --no-gradio-queue.
    An exception in `work` is re-raised here after the last progress yield.
    """
    state = {"fraction": 0.0, "text": "starting"}
    box: dict = {}

    def progress(fraction: float, text: str = "") -> None:
        state["fraction"], state["text"] = float(fraction), str(text)

    def target() -> None:
        try:
            box["result"] = work(progress)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=target, name="bp-train-task", daemon=True)
    t.start()
    while True:
        t.join(interval)
        if not t.is_alive():
            break
        yield render_progress(state["fraction"], state["text"])
    if "error" in box:
        raise box["error"]
    yield box["result"]
