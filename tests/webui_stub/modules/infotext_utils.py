"""Just what the stand-in needs: the WebUI's value quoting (v1.10.1 modules/infotext_utils.py:56-60: JSON-encode a
value holding ',', newline or ':', ensure_ascii=False) and a `PasteField` type."""

import json
from collections import namedtuple

PasteField = namedtuple("PasteField", ["component", "target", "api"])


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)
