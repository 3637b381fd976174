"""`modules.sd_hijack`: `model_hijack` with its embedding database (`--embeddings-dir` added at start-up,
`sd_hijack.py` l.190-191 of the v1.10-based copy named in `textual_inversion/textual_inversion.py`) and the
`fixes` of the chunk being encoded (l.178). `EmbeddingsWithFixes` (l.350-376) needs torch, so this stand-in keeps
it in `sd_hijack_clip.py` (imported only where torch exists); this module imports on the WebUI stack without it.
"""

from modules import shared
from modules.textual_inversion.textual_inversion import EmbeddingDatabase


class StableDiffusionModelHijack:
    def __init__(self):
        self.fixes = None
        self.embedding_db = EmbeddingDatabase()
        self.embedding_db.add_embedding_dir(shared.cmd_opts.embeddings_dir)


model_hijack = StableDiffusionModelHijack()
