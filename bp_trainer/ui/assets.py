"""The extension's `javascript/*.js` and `style.css`, for the standalone app.

Inside the WebUI these files are injected by the WebUI itself (`modules/ui_gradio_extensions.py`: a
`<script>` per `javascript/*.js` in `<head>`, every extension's `style.css` before `</body>`). The
standalone app must load the same files: `install_template_injection()` patches gradio 3.41's
`gradio.routes.templates.TemplateResponse` the way the WebUI does, inlining the files so nothing has to
be served from disk.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the extension/repository root


def js_files(root: Path = ROOT) -> list[Path]:
    return sorted((root / "javascript").glob("*.js"))


def css_text(root: Path = ROOT) -> str:
    path = root / "style.css"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def head_html(root: Path = ROOT) -> str:
    """`<script>` tags (inline) for every javascript/*.js, in the WebUI's order (sorted by name)."""
    out = []
    for path in js_files(root):
        code = path.read_text(encoding="utf-8").replace("</script", "<\\/script")
        out.append(f'<script data-bp-src="javascript/{path.name}">\n{code}\n</script>')
    return "\n".join(out)


def body_html(root: Path = ROOT) -> str:
    css = css_text(root).replace("</style", "<\\/style")
    return f'<style data-bp-src="style.css">\n{css}\n</style>' if css else ""


def inject(page: bytes, root: Path = ROOT) -> bytes:
    """Insert the scripts before `</head>` and the stylesheet before `</body>` of an HTML page."""
    head = head_html(root).encode("utf-8")
    body = body_html(root).encode("utf-8")
    if head:
        page = page.replace(b"</head>", head + b"\n</head>", 1)
    if body:
        page = page.replace(b"</body>", body + b"\n</body>", 1)
    return page


_installed = False


def install_template_injection(root: Path = ROOT) -> None:
    """Patch gradio's page template response (once per process) so every page carries our JS and CSS."""
    global _installed
    if _installed:
        return
    import gradio.routes

    original = gradio.routes.templates.TemplateResponse

    def template_response(*args, **kwargs):
        res = original(*args, **kwargs)
        res.body = inject(res.body, root)
        res.init_headers()
        return res

    gradio.routes.templates.TemplateResponse = template_response
    _installed = True
