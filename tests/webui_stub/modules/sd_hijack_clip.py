"""How WebUI v1.10.1 turns an SD 1.x prompt into conditioning with textual-inversion embeddings: the chunking of
`modules/sd_hijack_clip.py` (`FrozenCLIPEmbedderWithCustomWordsBase.tokenize_line`, l.81-174 of the v1.10-based copy
named in `textual_inversion/textual_inversion.py`), the insertion of `modules/sd_hijack.py`
(`EmbeddingsWithFixes.forward`, l.357-376) and the SD1 encoder (`FrozenCLIPEmbedderWithCustomWords`, clip skip
l.351-358). Rewritten from those rules, no WebUI code copied. Not modelled: emphasis (the prompts the tests use
have no brackets, so every multiplier is 1.0 and the WebUI's mean-restoring rescale leaves z unchanged), BREAK,
SD2/SDXL. Needs torch (the trainer's test stack).

tokenize_line, per token of the prompt:
  a comma sets `last_comma` to the chunk length (l.133-134); otherwise, when the chunk is full (75) and a comma
  is within `comma_padding_backtrack` tokens of its end, the tokens after that comma move to a new chunk — the
  closed chunk keeps its fixes, even those whose placeholders moved (l.138-149); a full chunk closes (l.151-152);
  an embedding found at the position (longest name match) closes the chunk first when its vectors do not fit
  (l.161-163), then records PromptChunkFix(len(chunk), embedding) and adds `vectors` placeholders of id 0
  (l.165-169). Closing pads with EOS to 75 and wraps BOS ... EOS (l.100-122); the count is 75 per closed chunk
  plus the last one's real length.
EmbeddingsWithFixes: after the token embedding lookup, for each fix of a row, rows offset+1 ... offset+n take the
  embedding's vectors, n = min(77 - offset - 1, vectors), fixes applied in order (l.367-372); position embeddings
  are added by CLIP afterwards.
"""

from collections import namedtuple

import torch

from modules import shared

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    def __init__(self):
        self.tokens = []
        self.multipliers = []
        self.fixes = []


class EmbeddingsWithFixes(torch.nn.Module):
    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack

    def forward(self, input_ids):
        batch_fixes, self.hijack.fixes = self.hijack.fixes, None
        embeds = self.wrapped(input_ids)
        if not batch_fixes or not any(batch_fixes):
            return embeds
        rows = []
        for fixes, row in zip(batch_fixes, embeds):
            for offset, embedding in fixes:
                vec = torch.as_tensor(embedding.vec).to(row.device)
                n = min(row.shape[0] - offset - 1, vec.shape[0])
                row = torch.cat([row[:offset + 1], vec[:n].to(row.dtype), row[offset + 1 + n:]])
            rows.append(row)
        return torch.stack(rows)


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    """`shared.sd_model.cond_stage_model` of an SD 1.x model: wraps a transformers CLIPTextModel and its tokenizer,
    with EmbeddingsWithFixes installed on the token embedding (as `StableDiffusionModelHijack.hijack` does)."""

    chunk_length = 75

    def __init__(self, transformer, tokenizer, hijack):
        super().__init__()
        self.transformer, self.tokenizer, self.hijack = transformer, tokenizer, hijack
        # transformers 4.30 (the WebUI's) nests the layers in .text_model; 5.x (this test stack) does not
        self.text_model = getattr(transformer, "text_model", transformer)
        embeddings = self.text_model.embeddings
        embeddings.token_embedding = EmbeddingsWithFixes(embeddings.token_embedding, hijack)
        self.id_start, self.id_end = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.comma_token = tokenizer.get_vocab().get(",</w>")

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def tokenize_line(self, line):
        chunks, state = [], {"chunk": PromptChunk(), "count": 0, "last_comma": -1}

        def next_chunk(is_last=False):
            chunk = state["chunk"]
            state["count"] += len(chunk.tokens) if is_last else self.chunk_length
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end] * (self.chunk_length - len(chunk.tokens) + 1)
            chunks.append(chunk)
            state["chunk"], state["last_comma"] = PromptChunk(), -1

        backtrack = int(shared.opts.comma_padding_backtrack)
        tokens = self.tokenize([line])[0]
        position = 0
        while position < len(tokens):
            token, chunk = tokens[position], state["chunk"]
            if token == self.comma_token:
                state["last_comma"] = len(chunk.tokens)
            elif (backtrack and len(chunk.tokens) == self.chunk_length and state["last_comma"] != -1
                  and len(chunk.tokens) - state["last_comma"] <= backtrack):
                cut = state["last_comma"] + 1
                moved, chunk.tokens = chunk.tokens[cut:], chunk.tokens[:cut]
                next_chunk()
                state["chunk"].tokens = moved
            if len(state["chunk"].tokens) == self.chunk_length:
                next_chunk()
            embedding, length = self.hijack.embedding_db.find_embedding_at_position(tokens, position)
            if embedding is None:
                state["chunk"].tokens.append(token)
                position += 1
                continue
            if len(state["chunk"].tokens) + embedding.vectors > self.chunk_length:
                next_chunk()
            state["chunk"].fixes.append(PromptChunkFix(len(state["chunk"].tokens), embedding))
            state["chunk"].tokens += [0] * embedding.vectors
            position += length
        if state["chunk"].tokens or not chunks:
            next_chunk(is_last=True)
        return chunks, state["count"]

    def encode_with_transformers(self, tokens):
        skip = int(shared.opts.CLIP_stop_at_last_layers)
        out = self.transformer(input_ids=tokens, output_hidden_states=skip > 1)
        if skip > 1:
            return self.text_model.final_layer_norm(out.hidden_states[-skip])
        return out.last_hidden_state

    def forward(self, texts):
        batch = [self.tokenize_line(t)[0] for t in texts]
        z = []
        for i in range(max(len(c) for c in batch)):
            chunk = [c[i] if i < len(c) else self._empty_chunk() for c in batch]
            self.hijack.fixes = [c.fixes for c in chunk]
            ids = torch.asarray([c.tokens for c in chunk]).to(next(self.transformer.parameters()).device)
            z.append(self.encode_with_transformers(ids))
        return torch.hstack(z)

    def _empty_chunk(self):
        chunk = PromptChunk()
        chunk.tokens = [self.id_start] + [self.id_end] * (self.chunk_length + 1)
        return chunk

    def encode_embedding_init_text(self, init_text, nvpt):
        layer = self.text_model.embeddings.token_embedding.wrapped
        ids = self.tokenizer(init_text, max_length=nvpt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        return layer(ids.to(layer.weight.device)).squeeze(0)
