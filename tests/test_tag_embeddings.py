"""Tag embeddings trained with the model: selection, initialisation, replacement in processed captions, WebUI
chunk counting, and fidelity of the exported files to the WebUI's own insertion rule (the `modules` stand-in's
`sd_hijack_clip`, written from WebUI v1.10.1) and to diffusers' `load_textual_inversion`. Tiny model, CPU, offline.
"""

from __future__ import annotations

import copy
import random
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from bp_trainer.dataset.captions import CaptionProcessor
from bp_trainer.errors import BPError, ConfigError
from bp_trainer.train import config as C
from bp_trainer.train.embedding_text import caption_chunks, tokenize_with_embeddings
from bp_trainer.train.embeddings import auto_tags, embedding_name, init_groups, name_problem, plan_embeddings
from bp_trainer.train.models import BACKTRACK, COMMA_TOKEN, encode_captions, tokenize_chunks
from bp_trainer.train.tag_embeddings import TagEmbeddings

FUZI = "fuzichoco"  # fu·z·ic·hoco
AMANO = "by_amanogawa_kyousuke"  # by·_·am·ano·g·awa·_·k·you·suke (by·am·ano·g·awa·k·you·suke spaced)
CAPTION = f"1girl, solo, {FUZI}, long_hair, {AMANO}, looking_at_viewer, simple_background, smile"


@pytest.fixture(scope="module")
def te(tiny_components):
    return tiny_components["text_encoder"]  # shared: never trained here


def make_embeddings(te, tok, tags, captions, *, spaces=False, perturb=None, **section):
    plans = plan_embeddings(C.EmbeddingsSection(tags=tuple(tags), **section), captions, tok,
                            underscores_to_spaces=spaces)
    emb = TagEmbeddings.create(plans, te.get_input_embeddings().weight)
    if perturb is not None:  # trained-looking vectors: different from every token's
        gen = torch.Generator().manual_seed(perturb)
        with torch.no_grad():
            for v in emb.vectors:
                v.add_(0.05 * torch.randn(v.shape, generator=gen))
    return emb


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


# ------------------------------------------------------------------------------------------------ plans


def test_init_groups_split_neighbouring_pieces_or_repeat_them_like_the_webui():
    assert init_groups(4, 4) == [[0], [1], [2], [3]]
    assert init_groups(4, 1) == [[0, 1, 2, 3]]
    assert init_groups(2, 4) == [[0], [0], [1], [1]]  # WebUI create_embedding: embedded[i * n // vectors]
    for sources in range(1, 12):
        for vectors in range(1, sources):
            groups = init_groups(sources, vectors)
            assert [i for g in groups for i in g] == list(range(sources))  # every piece once, in order
            sizes = [len(g) for g in groups]
            assert max(sizes) - min(sizes) <= 1 and len(groups) == vectors


def test_names_are_the_space_form_and_bad_file_names_are_one_line_config_errors(tmp_path):
    assert embedding_name(AMANO) == "by amanogawa kyousuke" and embedding_name(FUZI) == FUZI
    assert embedding_name("^_^") == "^_^"  # kaomoji keep their underscores, as the caption option does
    assert name_problem("fate/stay_night") and name_problem("") and name_problem(".hidden")
    assert name_problem("kaguya_(oshi_no_ko)") is None
    for body, message in (({"tags": ["fate/stay_night"]}, "embeddings.tags: 'fate/stay_night' cannot be"),
                          ({"vectors": 80}, "embeddings.vectors: 80 is above the maximum 75"),
                          ({"auto": {"min_images": 0}}, "embeddings.auto: min_images: 0 is below")):
        with pytest.raises(ConfigError) as err:
            C.validate({"embeddings": body}, check_paths=False)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_plans_count_pieces_as_the_captions_train_them(clip_tokenizer):
    captions = [CAPTION, "1girl, by amanogawa kyousuke", f"{AMANO}, solo"]
    plans = plan_embeddings(C.EmbeddingsSection(tags=(AMANO, FUZI, "by amanogawa kyousuke")), captions,
                            clip_tokenizer, underscores_to_spaces=False)
    assert [p.name for p in plans] == ["by amanogawa kyousuke", FUZI]  # both forms of one tag: one embedding
    amano = plans[0]
    assert amano.images == 3 and amano.train_text == AMANO  # `_` form: 2 of the 3 captions
    assert amano.vectors == len(ids_of(clip_tokenizer, AMANO)) == 10
    assert set(amano.aliases) == {tuple(ids_of(clip_tokenizer, AMANO)),
                                  tuple(ids_of(clip_tokenizer, "by amanogawa kyousuke"))}
    spaced = plan_embeddings(C.EmbeddingsSection(tags=(AMANO,)), captions, clip_tokenizer,
                             underscores_to_spaces=True)[0]
    assert spaced.train_text == "by amanogawa kyousuke" and spaced.vectors == 8
    two = plan_embeddings(C.EmbeddingsSection(tags=(AMANO,), vectors=2), captions, clip_tokenizer,
                          underscores_to_spaces=False)[0]
    init = plan_embeddings(C.EmbeddingsSection(tags=(FUZI,), init_text="artist"), captions, clip_tokenizer,
                           underscores_to_spaces=False)[0]
    assert two.vectors == 2 and init.init_ids == tuple(ids_of(clip_tokenizer, "artist")) and init.vectors == 1


def test_initial_vectors_are_the_pieces_token_embeddings_or_their_means(te, clip_tokenizer):
    weight = te.get_input_embeddings().weight.detach()
    ids = ids_of(clip_tokenizer, FUZI)
    emb = make_embeddings(te, clip_tokenizer, [FUZI], [FUZI])
    assert torch.equal(emb.vectors[0].detach(), weight[ids])
    one = make_embeddings(te, clip_tokenizer, [FUZI], [FUZI], vectors=1)
    assert torch.allclose(one.vectors[0].detach()[0], weight[ids].mean(0))
    two = make_embeddings(te, clip_tokenizer, [FUZI], [FUZI], vectors=2)
    assert torch.allclose(two.vectors[0].detach(), torch.stack([weight[ids[:2]].mean(0), weight[ids[2:]].mean(0)]))


def test_auto_selection_is_the_truthful_mangled_flag(clip_tokenizer):
    """`embeddings.auto` picks the tags the audit flags (a word CLIP cuts into meaningless pieces) that are in at
    least N images: the artist names, never a plain multi-word tag like multiple_girls."""
    captions = ([f"1girl, {FUZI}, multiple_girls, as109"] * 5 + [f"2girls, multiple_girls, {AMANO}"] * 4
                + ["1girl, by amanogawa kyousuke"])
    assert auto_tags(captions, clip_tokenizer, 5) == [FUZI, "as109", AMANO]  # by images: 5, 5, 5 (both forms)
    assert auto_tags(captions, clip_tokenizer, 6) == []


# ------------------------------------------------------------------------------------------------ step 0, replacement


def processed_captions(spaces: bool, n: int = 12):
    proc = CaptionProcessor(shuffle=True, keep_first=1, tag_dropout=0.2, caption_dropout=0.25,
                            underscores_to_spaces=spaces)
    return [proc.process(CAPTION, random.Random(seed)) for seed in range(n)]


@pytest.mark.parametrize("spaces", [False, True])
@pytest.mark.parametrize("clip_skip", [1, 2])
def test_step_zero_conditions_exactly_as_the_plain_caption(te, clip_tokenizer, spaces, clip_skip):
    texts = processed_captions(spaces)
    assert "" in texts and any(FUZI in t for t in texts) and any(t and FUZI not in t for t in texts)  # dropouts
    emb = make_embeddings(te, clip_tokenizer, [FUZI, AMANO], [CAPTION], spaces=spaces)
    plain = encode_captions(te, clip_tokenizer, texts, clip_skip=clip_skip, max_chunks=3)
    with_vectors = encode_captions(te, clip_tokenizer, texts, clip_skip=clip_skip, max_chunks=3, embeddings=emb)
    assert torch.equal(plain, with_vectors)  # bit for bit


def _replaced(ids, forms):
    """Brute force, another way than the code: the ids written as words, each form's run of ids substituted by that
    many zeros (longest form first)."""
    words = " ".join(map(str, ids))
    for form, vectors in sorted(forms, key=lambda f: -len(f[0])):
        words = re.sub(r"(?<!\S)" + re.escape(" ".join(map(str, form))) + r"(?!\S)", " ".join(["0"] * vectors), words)
    return [int(w) for w in words.split()]


@pytest.mark.parametrize("spaces", [False, True])
def test_replacement_finds_the_tag_after_shuffle_keep_tokens_and_dropout_in_either_form(te, clip_tokenizer, spaces):
    texts = processed_captions(spaces, 20) + [f"{AMANO}, 1girl", "by amanogawa kyousuke, 1girl"]
    emb = make_embeddings(te, clip_tokenizer, [FUZI, AMANO], [CAPTION], spaces=spaces)
    vectors = {FUZI: 4, "by amanogawa kyousuke": 8 if spaces else 10}  # the pieces of the form the captions train
    assert emb.sizes == vectors
    forms = [(ids_of(clip_tokenizer, form), vectors[embedding_name(form)])
             for form in (FUZI, AMANO, "by amanogawa kyousuke")]
    tokens = tokenize_with_embeddings(clip_tokenizer, texts, 3, emb.lookup, comma=COMMA_TOKEN, backtrack=BACKTRACK)
    assert tokens.ids.shape == (len(texts), 1, 77)  # short captions: one chunk each
    for i, text in enumerate(texts):
        tags = text.split(", ") if text else []
        expected = sorted(embedding_name(t) for t in tags if embedding_name(t) in vectors)
        assert sorted(name for _off, name in tokens.fixes[i]) == expected, text
        body = _replaced(ids_of(clip_tokenizer, text), forms)
        assert tokens.ids[i, 0].tolist() == [49406] + body + [49407] * (76 - len(body)), text


def test_gradients_reach_only_the_vectors_of_tags_in_the_batch(te, clip_tokenizer):
    te = copy.deepcopy(te).requires_grad_(False)
    emb = make_embeddings(te, clip_tokenizer, [FUZI, AMANO], [CAPTION])
    cond = encode_captions(te, clip_tokenizer, [f"1girl, {FUZI}"], clip_skip=2, max_chunks=3, embeddings=emb)
    cond.square().mean().backward()
    assert emb.vectors[0].grad is not None and emb.vectors[0].grad.abs().sum() > 0
    assert emb.vectors[1].grad is None or emb.vectors[1].grad.abs().sum() == 0
    assert all(p.grad is None for p in te.parameters())  # the frozen encoder stays frozen
    emb.sync_grads(SimpleNamespace(num_processes=1))
    assert torch.equal(emb.vectors[1].grad, torch.zeros_like(emb.vectors[1]))  # every rank steps every vector


# ------------------------------------------------------------------------------------------------ the WebUI


@pytest.fixture
def webui_clip(tmp_path, monkeypatch, te, clip_tokenizer):
    """The WebUI stand-in with an SD1 cond_stage_model around a copy of the tiny text encoder."""
    from tests.webui_stub.harness import load_webui, unload_webui

    w = load_webui(tmp_path, monkeypatch)
    from modules import sd_hijack, shared
    from modules.sd_hijack_clip import FrozenCLIPEmbedderWithCustomWords

    clip = FrozenCLIPEmbedderWithCustomWords(copy.deepcopy(te), clip_tokenizer, sd_hijack.model_hijack)
    shared.sd_model = SimpleNamespace(cond_stage_model=clip)
    yield SimpleNamespace(webui=w, clip=clip, shared=shared, db=sd_hijack.model_hijack.embedding_db,
                          embeddings_dir=Path(shared.cmd_opts.embeddings_dir))
    unload_webui()


def _webui_cond(env, prompt, clip_skip):
    env.shared.opts.CLIP_stop_at_last_layers = clip_skip
    with torch.no_grad():
        return env.clip([prompt])


def _export_and_load(env, emb, tmp_path, step=7):
    from bp_trainer.run_controller import publish_embedding

    records = emb.export(tmp_path / "run", metadata={"bp_train_step": str(step), "bp_base_autov2": "abc123"})
    for rec in records:
        publish_embedding(rec["path"], env.embeddings_dir)  # EMB_DIR/bp-train/<name>.safetensors
    env.db.load_textual_inversion_embeddings(force_reload=True)
    return records


def test_exported_files_load_by_name_in_the_webui_and_condition_as_in_training(te, clip_tokenizer, webui_clip,
                                                                                tmp_path):
    emb = make_embeddings(te, clip_tokenizer, [FUZI, AMANO], [CAPTION], perturb=3)
    records = _export_and_load(webui_clip, emb, tmp_path)
    assert [(r["name"], r["vectors"]) for r in records] == [(FUZI, 4), ("by amanogawa kyousuke", 10)]
    path = tmp_path / "run" / "embeddings" / "by amanogawa kyousuke.safetensors"
    with safe_open(str(path), framework="pt") as fh:
        assert list(fh.keys()) == ["emb_params"] and tuple(fh.get_tensor("emb_params").shape) == (10, 32)
        meta = fh.metadata()
    assert (meta["bp_embedding_tag"], meta["bp_train_step"], meta["bp_base_autov2"]) == (AMANO, "7", "abc123")
    loaded = webui_clip.db.word_embeddings
    assert {n: e.vectors for n, e in loaded.items()} == {"by amanogawa kyousuke": 10, FUZI: 4}
    long_tail = ", ".join(f"tag{i}" for i in range(20))  # 2 chunks: the embeddings far from the start too
    for caption in (CAPTION, f"{long_tail}, {AMANO}, {FUZI}, {long_tail}"):
        prompt = caption.replace(AMANO, "by amanogawa kyousuke")  # what users type in txt2img
        for clip_skip in (1, 2):
            ours = encode_captions(te, clip_tokenizer, [caption], clip_skip=clip_skip, max_chunks=3,
                                   embeddings=emb).detach()
            theirs = _webui_cond(webui_clip, prompt, clip_skip)
            plain = encode_captions(te, clip_tokenizer, [caption], clip_skip=clip_skip, max_chunks=3)
            assert ours.shape == theirs.shape
            assert torch.equal(ours, theirs), (caption[:30], clip_skip)  # bit for bit
            assert (plain - theirs).abs().max() > 0.1  # and the trained vectors do matter


def test_chunk_counting_moves_an_embedding_whole_as_the_webui_counts_it(te, clip_tokenizer, webui_clip, tmp_path):
    from bp_trainer.tokens import inspect_prompt

    emb = make_embeddings(te, clip_tokenizer, [FUZI], [FUZI], perturb=5)
    _export_and_load(webui_clip, emb, tmp_path)
    a = ids_of(clip_tokenizer, "a")[0]
    # 72 tokens, then 4 vectors: they do not fit in 75 and move whole to chunk 2 (as plain pieces, one would)
    prompt = "a " * 72 + FUZI
    ours = caption_chunks(ids_of(clip_tokenizer, prompt), emb.lookup, bos=49406, eos=49407, pad=49407,
                          comma=COMMA_TOKEN, backtrack=BACKTRACK, max_chunks=3)
    assert [row[1:77] for row, _ in ours] == [[a] * 72 + [49407] * 4, [0] * 4 + [49407] * 72]
    assert [fixes for _, fixes in ours] == [[], [(0, FUZI)]]
    chunks, count = webui_clip.clip.tokenize_line(prompt)
    assert [c.tokens for c in chunks] == [row for row, _ in ours]
    assert [[f.offset for f in c.fixes] for c in chunks] == [[], [0]] and count == 75 + 4
    counted = inspect_prompt(prompt, clip_tokenizer, embeddings={FUZI: 4})
    assert (counted["count"], counted["limit"]) == (79, 150)
    assert inspect_prompt(prompt, clip_tokenizer)["count"] == 76  # plain pieces: 72 + 3 fit, 1 moves
    # the comma rule moves placeholders after a comma near the end; the WebUI keeps their fix in the first chunk
    quirk = "a " * 70 + f", {FUZI} x"
    ours = caption_chunks(ids_of(clip_tokenizer, quirk), emb.lookup, bos=49406, eos=49407, pad=49407,
                          comma=COMMA_TOKEN, backtrack=BACKTRACK, max_chunks=3)
    chunks, _ = webui_clip.clip.tokenize_line(quirk)
    assert [c.tokens for c in chunks] == [row for row, _ in ours]
    assert [[f.offset for f in c.fixes] for c in chunks] == [[o for o, _ in fx] for _, fx in ours] == [[71], []]
    for text in (prompt, quirk):
        for clip_skip in (1, 2):
            theirs = _webui_cond(webui_clip, text, clip_skip)
            mine = encode_captions(te, clip_tokenizer, [text], clip_skip=clip_skip, max_chunks=3, embeddings=emb)
            assert torch.equal(mine.detach(), theirs), (text[-20:], clip_skip)


def test_diffusers_form_loads_with_load_textual_inversion(te, clip_tokenizer, tiny_components, tmp_path):
    from diffusers import StableDiffusionPipeline

    emb = make_embeddings(te, clip_tokenizer, [AMANO], [CAPTION], spaces=True, perturb=9)
    rec = emb.export(tmp_path / "run", metadata={})[0]
    folder = Path(rec["diffusers"]).parent
    assert folder == tmp_path / "run" / "embeddings-diffusers" / "by amanogawa kyousuke"
    pipe = StableDiffusionPipeline(vae=tiny_components["vae"], text_encoder=copy.deepcopy(te),
                                   tokenizer=copy.deepcopy(clip_tokenizer), unet=tiny_components["unet"],
                                   scheduler=tiny_components["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(folder))
    prompt = "1girl, by amanogawa kyousuke, solo"
    theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    ours = encode_captions(te, clip_tokenizer, [prompt], clip_skip=1, max_chunks=1, embeddings=emb)
    plain = encode_captions(te, clip_tokenizer, [prompt], clip_skip=1, max_chunks=1)
    assert torch.equal(ours.detach(), theirs) and (plain - theirs).abs().max() > 0.1
    # clip skip 2 (diffusers' clip_skip=1, whose encode_prompt reaches .text_model, gone in transformers 5): the
    # pipeline's own tokens (the loaded token and its _1 ... _7) through its resized encoder
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        theirs = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hidden)
    ours = encode_captions(te, clip_tokenizer, [prompt], clip_skip=2, max_chunks=1, embeddings=emb)
    assert torch.equal(ours.detach(), theirs)


def test_a_state_with_other_embeddings_is_refused_on_resume(te, clip_tokenizer, tmp_path):
    emb = make_embeddings(te, clip_tokenizer, [FUZI], [FUZI], perturb=1)
    emb.save_state(tmp_path)
    again = make_embeddings(te, clip_tokenizer, [FUZI], [FUZI])
    again.load_state(tmp_path)
    assert torch.equal(again.vectors[0], emb.vectors[0])
    other = make_embeddings(te, clip_tokenizer, [AMANO], [CAPTION])
    with pytest.raises(BPError, match=re.escape("differ from the run's (by amanogawa kyousuke)")):
        other.load_state(tmp_path)
    with pytest.raises(BPError, match="has no tag embeddings"):
        other.load_state(tmp_path / "nowhere")
