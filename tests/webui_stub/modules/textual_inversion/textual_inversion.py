"""`modules.textual_inversion.textual_inversion`: the embedding database (loading by file name, matching by ids).

Written from the v1.10.1 behaviour; line numbers are those of `modules/textual_inversion/textual_inversion.py` in a
v1.10-based copy (ussoewwin/A1111-for-Python3.12 @ dcce1fb1; the official repository was not available at the
tag here). What is modelled:
- `load_textual_inversion_embeddings(force_reload)` (l.212-243): reload only when an embeddings folder's mtime
  grew (`DirWithTextualInversionEmbeddings.has_changed`, l.96) unless forced; clear, read the expected width
  from the model (l.152), walk every folder recursively following links (l.199), skip empty files, load each;
  a later file of the same name replaces the earlier (l.129-149); names sorted case-insensitively (l.234).
- `load_from_file` (l.157-193): the name is the file name without extension; `.safetensors` is read whole
  (l.179-180); `.pt`/`.bin` (pickles) and images are not modelled here; an embedding of another width is
  `skipped` (l.187-190).
- `create_embedding_from_data` (l.287-323): a dict of exactly one tensor ("multiple terms" otherwise, l.301), a
  1-D tensor becomes one vector (l.304-305); `vectors` = rows, `shape` = width.
- `register_embedding_by_name` (l.129-150): ids = `model.cond_stage_model.tokenize([name])[0]` (no BOS/EOS),
  kept under the first id, longest first.
- `find_embedding_at_position` (l.245-256): the first (longest) candidate whose ids match at the offset.
Tensors are read with safetensors' numpy reader (this stand-in also runs on the WebUI stack without torch) and
become float32 torch tensors when torch is importable, as the WebUI's `.to(dtype=torch.float32)`.
"""

import os

import numpy as np

from modules import shared


class Embedding:
    def __init__(self, vec, name, step=None):
        self.vec = vec
        self.name = name
        self.step = step
        self.shape = None
        self.vectors = 0
        self.filename = None


class DirWithTextualInversionEmbeddings:
    def __init__(self, path):
        self.path = path
        self.mtime = None

    def has_changed(self):
        if not os.path.isdir(self.path):
            return False
        mtime = os.path.getmtime(self.path)
        return self.mtime is None or mtime > self.mtime

    def update(self):
        if os.path.isdir(self.path):
            self.mtime = os.path.getmtime(self.path)


def _as_float32(array):
    try:
        import torch
    except ImportError:
        return np.asarray(array, dtype=np.float32)
    return torch.as_tensor(np.asarray(array, dtype=np.float32))


def create_embedding_from_data(data, name, filename="unknown embedding file", filepath=None):
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError(f"{filename}: embedding file has multiple terms in it")
    array = np.asarray(next(iter(data.values())))
    if array.ndim == 1:
        array = array[None, :]
    embedding = Embedding(_as_float32(array), name)
    embedding.vectors, embedding.shape = int(array.shape[0]), int(array.shape[-1])
    embedding.filename = filepath
    return embedding


class EmbeddingDatabase:
    def __init__(self):
        self.ids_lookup = {}
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.expected_shape = -1
        self.embedding_dirs = {}
        self.loads = 0  # for tests: how many times the folders were (re)read

    def add_embedding_dir(self, path):
        self.embedding_dirs[path] = DirWithTextualInversionEmbeddings(path)

    def register_embedding_by_name(self, embedding, model, name):
        ids = model.cond_stage_model.tokenize([name])[0]
        first = ids[0]
        lookup = [x for x in self.ids_lookup.get(first, []) if x[1].name != name]
        lookup.append((ids, embedding))
        self.ids_lookup[first] = sorted(lookup, key=lambda x: len(x[0]), reverse=True)
        self.word_embeddings[name] = embedding
        return embedding

    def register_embedding(self, embedding, model):
        return self.register_embedding_by_name(embedding, model, embedding.name)

    def get_expected_shape(self):
        encode = getattr(shared.sd_model.cond_stage_model, "encode_embedding_init_text", None)
        return int(encode(",", 1).shape[1]) if encode is not None else -1

    def load_from_file(self, path, filename):
        name, ext = os.path.splitext(filename)
        if ext.upper() != ".SAFETENSORS":
            return
        from safetensors.numpy import load_file

        embedding = create_embedding_from_data(load_file(path), name, filename=filename, filepath=path)
        if self.expected_shape == -1 or self.expected_shape == embedding.shape:
            self.register_embedding(embedding, shared.sd_model)
        else:
            self.skipped_embeddings[name] = embedding

    def load_from_dir(self, embdir):
        if not os.path.isdir(embdir.path):
            return
        for root, _dirs, files in os.walk(embdir.path, followlinks=True):
            for fn in files:
                full = os.path.join(root, fn)
                try:
                    if os.stat(full).st_size:
                        self.load_from_file(full, fn)
                except Exception as exc:  # the WebUI reports and goes on
                    print(f"Error loading embedding {fn}: {exc}")

    def load_textual_inversion_embeddings(self, force_reload=False):
        if not force_reload and not any(d.has_changed() for d in self.embedding_dirs.values()):
            return
        self.loads += 1
        self.ids_lookup.clear()
        self.word_embeddings.clear()
        self.skipped_embeddings.clear()
        self.expected_shape = self.get_expected_shape()
        for embdir in self.embedding_dirs.values():
            self.load_from_dir(embdir)
            embdir.update()
        ordered = {e.name: e for e in sorted(self.word_embeddings.values(), key=lambda e: e.name.lower())}
        self.word_embeddings.clear()
        self.word_embeddings.update(ordered)

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], ()):
            if tokens[offset:offset + len(ids)] == ids:
                return embedding, len(ids)
        return None, None
