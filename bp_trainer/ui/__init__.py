"""The "BP Train" tab (gradio 3.41), shared by the WebUI extension and the standalone app.

`bp_trainer.ui.tab.build_tab(host)` builds the tab; `host` (see `host.py`) is the only thing that differs
between the WebUI (`scripts/`) and the standalone app (`python -m bp_trainer ui`).
"""
