"""`modules.script_callbacks`: the registration functions BP Train uses and the WebUI's callers of them."""

import traceback

_names = ("ui_tabs", "ui_settings", "app_started", "infotext_pasted", "script_unloaded", "before_reload",
          "model_loaded")
callback_map = {f"callbacks_{n}": [] for n in _names}
errors = []  # exceptions raised by callbacks (the WebUI reports them and goes on)


def clear_callbacks():
    for v in callback_map.values():
        v.clear()


def _add(name, callback):
    callback_map[f"callbacks_{name}"].append(callback)


def on_ui_tabs(callback, *, name=None):
    _add("ui_tabs", callback)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback)


def on_app_started(callback, *, name=None):
    _add("app_started", callback)


def on_infotext_pasted(callback, *, name=None):
    _add("infotext_pasted", callback)


def on_script_unloaded(callback, *, name=None):
    _add("script_unloaded", callback)


def on_before_reload(callback, *, name=None):
    _add("before_reload", callback)


def on_model_loaded(callback, *, name=None):
    _add("model_loaded", callback)


def _run(name, *args):
    results = []
    for cb in callback_map[f"callbacks_{name}"]:
        try:
            results.append(cb(*args))
        except Exception as exc:
            errors.append((name, exc, traceback.format_exc()))
    return results


def ui_tabs_callback():
    res = []
    for r in _run("ui_tabs"):
        res += r or []
    return res


def ui_settings_callback():
    _run("ui_settings")


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def infotext_pasted_callback(infotext, params):
    _run("infotext_pasted", infotext, params)


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def script_unloaded_callback():
    _run("script_unloaded")
