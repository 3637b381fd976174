"""The host's prompt settings that change token counts (the WebUI's emphasis mode, comma back-off, old
scheduling, loaded embeddings), read from any host object that offers `prompt_settings()`."""

from __future__ import annotations

from typing import Any

PROMPT_SETTINGS = ("emphasis", "backtrack", "use_old_scheduling", "embeddings")


def prompt_settings_of(host: Any) -> dict:
    """`host.prompt_settings()` filtered to `inspect_prompt`'s keywords; {} when the host has none or it fails
    (the counter then uses the WebUI's defaults)."""
    fn = getattr(host, "prompt_settings", None)
    if not callable(fn):
        return {}
    try:
        settings = fn() or {}
    except Exception:
        return {}
    return {k: v for k, v in dict(settings).items() if k in PROMPT_SETTINGS}
