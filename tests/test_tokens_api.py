"""`POST /bp-train/v1/tokens` through the real FastAPI app: no request ties up the server, no input gives a 500.

Behaviour, not timing: a hostile request gets a 4xx naming the field, and once it is answered no thread of the
process is still counting (every thread's stack is inspected) and every counting slot is free. The time the
answers take is measured in bench/bench_tokens.py (bench/RESULTS-tokens.md)."""

from __future__ import annotations

import sys
import threading

import pytest

from bp_trainer.tokens import request as tokens_request
from bp_trainer.tokens.limits import PromptLimits

URL = "/bp-train/v1/tokens"


class TokenHost:
    """The part of a host /tokens uses: the tokenizer and the WebUI's prompt settings."""

    name = "test"

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.tokenizer_calls = 0

    def tokenizer(self):
        self.tokenizer_calls += 1
        return self._tokenizer

    def prompt_settings(self):
        return {"backtrack": 20}


class Client:
    """Requests to the ASGI app in this process (httpx's ASGI transport, as tests/test_api.py; the fastapi 0.94
    TestClient does not run on httpx 0.28). An exception escaping the app is a 500, as a server would answer."""

    def __init__(self, app):
        self.app = app

    def post(self, url, **kw):
        import asyncio

        import httpx

        async def go():
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.post(url, **kw)

        return asyncio.run(go())


@pytest.fixture
def client(clip_tokenizer):
    from fastapi import FastAPI

    from bp_trainer.api import create_router

    host = TokenHost(clip_tokenizer)
    app = FastAPI()
    app.include_router(create_router(host))
    return Client(app), host


def counting_threads() -> list:
    """Names of the other threads whose stack is inside the token counter or the schedule parser."""
    busy = []
    for ident, frame in sys._current_frames().items():
        if ident == threading.get_ident():
            continue
        while frame is not None:
            name = frame.f_code.co_filename.replace("\\", "/")
            if "/bp_trainer/tokens/" in name or "/lark/" in name:
                busy.append(ident)
                break
            frame = frame.f_back
    return busy


def slots_free() -> bool:
    taken = []
    try:
        for _ in range(tokens_request.MAX_CONCURRENT):
            if not tokens_request._SLOTS.acquire(blocking=False):
                return False
            taken.append(1)
        return True
    finally:
        for _ in taken:
            tokens_request._SLOTS.release()


def test_a_one_megabyte_prompt_is_refused_and_leaves_no_work(client):
    test_client, host = client
    r = test_client.post(URL, json={"text": "masterpiece, (best:1.2) [a|b] " * 35_000})  # ~1 MB
    assert r.status_code == 413 and r.json()["detail"].startswith("'text': ")
    assert host.tokenizer_calls == 0  # refused before any counting
    # Small enough to be read, too long to count: the same answer from the core's own check.
    r = test_client.post(URL, json={"text": "a, " * 20_000})
    assert r.status_code == 400 and "'text'" in r.json()["detail"] and "characters" in r.json()["detail"]
    assert counting_threads() == [] and slots_free()


def test_the_core_refuses_a_megabyte_prompt_without_http():
    from bp_trainer.errors import BPError

    with pytest.raises(BPError, match="'text': the prompt is 1048576 characters long"):
        tokens_request.answer_tokens({"text": "(a:1.1) [b|c], " * 69_905 + "x"}, lambda: None, {})


@pytest.mark.parametrize("text,problem", [
    ("(" * 40 + "deep", "nested 40 deep"),
    ("x" + "(a) " * 3000 + ", [a|b]", None),  # accepted: 12 KB, one long emphasis run, 2 texts
    ("(a)" * 4000, "too long to tokenize"),  # equal weights merge: one 4,000-letter word
    ("[" + "(a)" * 60 + "[b|c]:d:3]", "one part read as a schedule has"),
    ("[a:b:3] (" + "(x) [y:z:2] " * 40, "brackets do not balance"),
    ("a" * 3000, "too long to tokenize"),
    ("[a|b|c] " * 1000 + "[d|e] " * 1000, "texts of"),  # 150 steps x 14 KB
])
def test_hostile_prompts_get_a_400_naming_text(client, clip_tokenizer, text, problem):
    test_client, _ = client
    r = test_client.post(URL, json={"text": text, "steps": 150})
    if problem is None:
        assert r.status_code == 200, r.json()
    else:
        assert r.status_code == 400 and r.json()["detail"].startswith("'text': ") and problem in r.json()["detail"]
    assert counting_threads() == [] and slots_free()


def test_words_are_measured_as_the_webui_tokenizer_cleans_them(clip_tokenizer):
    """transformers' slow CLIPTokenizer (the WebUI's) runs ftfy's fix_text before BPE, which turns `&#97;` into
    `a`: 3,000 of them are one 3,000-letter word for it, and must be refused though the raw text has none."""
    from bp_trainer.errors import BPError
    from bp_trainer.tokens import inspect_prompt

    ftfy = pytest.importorskip("ftfy")

    class SlowLike:
        fix_text = staticmethod(ftfy.fix_text)

        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *a, **k):
            return self.inner(*a, **k)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    text = "&#97;" * 3000
    if not callable(getattr(clip_tokenizer, "fix_text", None)):  # transformers 5's fast tokenizer: no ftfy
        assert inspect_prompt(text, clip_tokenizer)["count"] > 0
    with pytest.raises(BPError, match="too long to tokenize"):
        inspect_prompt(text, SlowLike(clip_tokenizer))


def test_work_past_the_time_budget_stops_with_a_400(client, monkeypatch):
    """Hundreds of distinct nested schedules are each a fresh Earley parse: more than a 50 ms budget anywhere."""
    test_client, _ = client
    monkeypatch.setattr(tokens_request, "DEFAULT_LIMITS", PromptLimits(time_s=0.05))
    text = ", ".join(f"[(w{i}:1.1):v{i}:{i % 9 + 1}]" for i in range(600))
    r = test_client.post(URL, json={"text": text})
    assert r.status_code == 400 and "took longer than 0.05 s" in r.json()["detail"]
    assert counting_threads() == [] and slots_free()


def test_loading_the_tokenizer_is_not_part_of_the_time_budget(clip_tokenizer, monkeypatch):
    """A host may load its tokenizer on the first request (seconds on a busy machine): that is not the count's
    work, and must not turn a small prompt into a 'took longer' error."""
    import time

    monkeypatch.setattr(tokens_request, "DEFAULT_LIMITS", PromptLimits(time_s=1.0))

    def slow_to_load():
        time.sleep(1.5)
        return clip_tokenizer

    clip_tokenizer("warm up", add_special_tokens=False)
    assert tokens_request.answer_tokens({"text": "1girl, solo"}, slow_to_load, {})["count"] == 4


def test_a_count_waits_for_a_free_slot_then_gets_429(client, monkeypatch):
    test_client, _ = client
    monkeypatch.setattr(tokens_request, "WAIT_S", 0.01)
    with tokens_request.counting_slot(), tokens_request.counting_slot():  # both slots busy
        r = test_client.post(URL, json={"text": "1girl"})
    assert r.status_code == 429 and "try again" in r.json()["detail"] and r.headers["retry-after"] == "1"
    assert test_client.post(URL, json={"text": "1girl"}).status_code == 200


@pytest.mark.parametrize("body,field", [
    ({"text": "a", "steps": 1e30}, "'steps'"),
    ({"text": "a", "steps": "abc"}, "'steps'"),
    ({"text": "a", "steps": 0}, "'steps'"),
    ({"text": "a", "steps": -5}, "'steps'"),
    ({"text": "a", "steps": 151}, "'steps'"),
    ({"text": "a", "steps": 2.5}, "'steps'"),
    ({"text": "a", "steps": True}, "'steps'"),
    ({"text": "a", "steps": [20]}, "'steps'"),
    ({"text": "a", "steps": 10 ** 40}, "'steps'"),
    ({"text": 5}, "'text'"),
    ({"text": ["a"]}, "'text'"),
    ({"text": None}, "'text'"),
    ({}, "'text'"),
    ({"text": "a", "negative": "yes"}, "'negative'"),
    ({"text": "a", "with_ids": 1}, "'with_ids'"),
    ({"text": "a", "stepz": 20}, "'stepz'"),
])
def test_bad_fields_are_400_naming_the_field(client, body, field):
    test_client, _ = client
    r = test_client.post(URL, json=body)
    assert r.status_code == 400 and field in r.json()["detail"], (r.status_code, r.text)
    assert "\n" not in r.json()["detail"]


def test_steps_rule_absent_means_20_otherwise_1_to_150(client):
    test_client, _ = client
    prompt = "[a|b] [c:d:7]"
    for given, used in ((None, 20), (1, 1), ("30", 30), (20.0, 20), (150, 150)):
        body = {"text": prompt} if given is None else {"text": prompt, "steps": given}
        r = test_client.post(URL, json=body)
        assert r.status_code == 200 and r.json()["steps"] == used
    assert test_client.post(URL, json={"text": prompt, "steps": None}).json()["steps"] == 20
    r = test_client.post(URL, json={"text": "a", "stepz": 3})
    assert "did you mean 'steps'?" in r.json()["detail"]


def test_no_value_of_any_field_gives_a_500(client):
    test_client, _ = client
    values = [None, True, False, 0, -1, 1, 20, 151, 1e30, -1e30, 2.5, float("1e308"), "", "x", "20", "1e30",
              [], [1], {}, {"a": 1}, "(" * 50, "\\", "[a:b:", "AND", "<lora:x>", "\u0000", "\ud7ff"]
    for field in ("text", "steps", "negative", "with_ids"):
        for value in values:
            body = {"text": "1girl", field: value}
            r = test_client.post(URL, json=body)
            assert r.status_code in (200, 400), (field, value, r.status_code, r.text)
    for raw in (b"", b"null", b"[1]", b"not json", b'{"text": "a"', b'"text"', b'{"text": "a", "steps": Infinity}',
                b'{"text": "a", "steps": NaN}', b'{"text": "a", "steps": 1' + b"0" * 5000 + b"}"):
        r = test_client.post(URL, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.status_code)
