"""`modules.scripts`: the Script base class, script loading like `load_scripts`, and a ScriptRunner."""

import importlib.util
import os
import re
import sys
from collections import namedtuple

import gradio as gr

from modules import paths, script_callbacks

AlwaysVisible = object()
current_basedir = paths.script_path


def basedir():
    """The extension folder of the script being imported (valid only during import)."""
    return current_basedir


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data = []


def load_module(path):
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def load_scripts(extension_roots):
    """As `load_scripts()`: clear callbacks, import each extension's scripts/*.py with the extension root first
    on sys.path (restored afterwards), and register every Script subclass found in the module's namespace."""
    global current_basedir
    script_callbacks.clear_callbacks()
    scripts_data.clear()
    for root in extension_roots:
        folder = os.path.join(root, "scripts")
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if not name.endswith(".py") or not os.path.isfile(path):
                continue
            syspath = sys.path
            try:
                sys.path = [root] + sys.path
                current_basedir = root
                module = load_module(path)
                for obj in module.__dict__.values():
                    if type(obj) == type and issubclass(obj, Script):  # noqa: E721 - as the WebUI checks
                        scripts_data.append(ScriptClassData(obj, path, root, module))
            finally:
                sys.path = syspath
                current_basedir = paths.script_path


class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []
        self.titles = []
        self.infotext_fields = []
        self.paste_field_names = []
        self.inputs = [None]
        self.dropdown = None

    def initialize_scripts(self, is_img2img):
        for data in scripts_data:
            script = data.script_class()
            script.filename = data.path
            script.is_txt2img = not is_img2img
            script.is_img2img = is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)

    def setup_ui(self):
        self.titles = [s.title() for s in self.selectable_scripts]
        self.dropdown = gr.Dropdown(label="Script", elem_id="script_list", choices=["None"] + self.titles,
                                    value="None", type="index")
        self.inputs[0] = self.dropdown
        for script in self.selectable_scripts:
            script.name = script.title().lower()
            with gr.Group(visible=False) as group:
                controls = script.ui(script.is_img2img)
            script.group = group
            script.controls = controls
            script.args_from = len(self.inputs)
            self.inputs.extend(controls or [])
            script.args_to = len(self.inputs)
            if script.infotext_fields is not None:
                self.infotext_fields += script.infotext_fields
            if script.paste_field_names is not None:
                self.paste_field_names += script.paste_field_names
        self.infotext_fields.append((self.dropdown, lambda x: gr.update(value=x.get("Script", "None"))))
        return self.inputs

    def before_process(self, p):
        for script in self.alwayson_scripts:
            script.before_process(p, *p.script_args[script.args_from:script.args_to])

    def run(self, p, *args):
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        script_args = args[script.args_from:script.args_to]
        return script.run(p, *script_args)

    def script(self, title):
        for s in self.scripts:
            if s.title().lower() == title.lower():
                return s
        return None
