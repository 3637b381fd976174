"""HTTP API under `/bp-train/v1/`, so training runs can be scripted (WebUI and standalone app alike).

`create_router(host)` returns a FastAPI `APIRouter` (works on the WebUI's fastapi 0.94 + pydantic 1 and on
newer versions); the WebUI glue mounts it in `on_app_started`, the standalone app in its launcher. The route
logic is in plain functions (`status`, `start`, `stop`, `events`, `tokens`, `presets`, `infotext`) that take
the host and a request dict, so it is testable without HTTP. Runs go through the same shared
`RunController` as the tab (`bp_trainer.run_controller.controller_for`), so the tab shows a run started by the API
and the other way round, and there is one run at a time.

    GET  /bp-train/v1/status                       trainer env, GPU hand-off, active run, recent runs
    POST /bp-train/v1/start   {config | config_path | resume_dir, train_preset?}
    POST /bp-train/v1/stop    {force?}              graceful stop (pressed twice: SIGTERM)
    GET  /bp-train/v1/events?offset=N               events.jsonl of the current run since byte N
    POST /bp-train/v1/tokens  {text, steps?, negative?, with_ids?}   the WebUI token counter and chunks
    GET  /bp-train/v1/presets                       generation presets of the "BP presets" Script
    POST /bp-train/v1/infotext {text}               parse an infotext and the preset it makes

Errors: a user error is HTTP 400 (409 when a run is already running / none is running) with
`{"detail": "one line naming the file or key and what to do"}`.
"""


import os
from pathlib import Path
from typing import Any, Dict, Optional

from bp_trainer import __version__, access
from bp_trainer.errors import BPError
from bp_trainer.rundir import RunDir

PREFIX = "/bp-train/v1"


class Conflict(BPError):
    """The request conflicts with the current state (a run is running / none is)."""


def _controller(host: Any) -> Any:
    from bp_trainer.run_controller import controller_for

    return controller_for(host)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _presets_file(host: Any) -> Optional[str]:
    fn = getattr(host, "presets_file", None)
    return fn() if callable(fn) else None


def status(host: Any, request: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from bp_trainer import launcher, trainer_env

    ctl = _controller(host)
    ctl.attach_existing()  # a restarted WebUI finds a run that kept going
    env_fn = getattr(host, "trainer_env_status", None)
    try:
        env = env_fn() if callable(env_fn) else trainer_env.status().to_dict()
    except BPError as exc:  # e.g. requirements-trainer.txt missing: report it, the rest of the status still counts
        env = {"state": "error", "message": str(exc)}
    gpu_fn = getattr(host, "gpu_status", None)
    gpu = gpu_fn() if callable(gpu_fn) else {}
    gpu.setdefault("generation_may_run_during_training", bool(host.generation_may_run_during_training()))
    runs = launcher.list_runs(host.runs_dir())[:10]
    return _jsonable({
        "version": __version__,
        "host": getattr(host, "name", "?"),
        "runs_dir": host.runs_dir(),
        "active": ctl.busy,
        "run": ctl.snapshot(),
        "trainer_env": env,
        "gpu": gpu,
        "runs": runs,
    })


def _load_start_config(host: Any, request: Dict[str, Any]) -> tuple:
    from bp_trainer.train import config as C

    sources = [k for k in ("config", "config_path", "resume_dir") if request.get(k) not in (None, "")]
    if len(sources) != 1:
        raise BPError("give exactly one of 'config' (a run config mapping), 'config_path' (a run YAML on the "
                      "server) or 'resume_dir' (a run folder to resume)", hint=f"got {sources or 'none'}")
    roots = access.roots_of(host)
    resume_dir = None
    if sources == ["config_path"]:
        cfg = C.load_config(roots.run_file("config_path", request["config_path"]))
    elif sources == ["resume_dir"]:
        resume_dir = roots.run_file("resume_dir", request["resume_dir"])
        if not RunDir(resume_dir).config.is_file():
            raise BPError("'resume_dir' is not a run folder (no config.yaml)", hint="pass a folder listed by /status")
        cfg = C.load_config(RunDir(resume_dir).config)
    else:
        raw = request["config"]
        if not isinstance(raw, dict):
            raise BPError("'config' must be a mapping of sections (model, dataset, training, ...)")
        preset = request.get("train_preset")
        if preset not in (None, ""):
            if not isinstance(preset, str):
                raise BPError("'train_preset' must be a preset name such as \"768\"")
            raw = C.merge(C.preset(preset), raw)
        cfg = C.validate(raw, source="request config")
    access.check_config_paths(cfg, roots)
    # runs live in the host's runs folder, where the tab and /status look for them; the trainer is the host's
    return cfg.with_values(run={"runs_dir": host.runs_dir(), "python": ""}), resume_dir


def start(host: Any, request: Dict[str, Any]) -> Dict[str, Any]:
    ctl = _controller(host)
    ctl.attach_existing()
    if ctl.busy:
        raise Conflict("a training run is already running", path=ctl.run_dir, hint="stop it first (POST /stop)")
    cfg, resume_dir = _load_start_config(host, request)
    try:
        run_dir = ctl.start(cfg, resume_dir=resume_dir, wait=False)
    except BPError as exc:
        if "already running" in str(exc):
            raise Conflict(str(exc)) from None
        raise
    # answered at once (202): the GPU hand-off may wait for a generation; follow with /status or /events
    return {"run_dir": str(run_dir), "name": Path(run_dir).name, "status": "starting", "gpu_note": ctl.gpu_note()}


def stop(host: Any, request: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from bp_trainer import launcher

    request = request or {}
    ctl = _controller(host)
    ctl.attach_existing()
    if not ctl.active or ctl.run_dir is None:
        raise Conflict("no training run is running")
    if request.get("force"):
        launcher.stop_run(ctl.run_dir, force=True)
        return {"run_dir": str(ctl.run_dir), "message": "the run's processes were killed"}
    return {"run_dir": str(ctl.run_dir), "message": ctl.stop()}


def events(host: Any, request: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from bp_trainer.train.events import follow

    request = request or {}
    ctl = _controller(host)
    ctl.attach_existing()
    run_dir = request.get("run_dir") or ctl.run_dir
    if not run_dir:
        raise Conflict("no run to follow", hint="start one, or pass run_dir")
    if request.get("run_dir"):
        run_dir = access.roots_of(host).run_file("run_dir", run_dir)
    offset = request.get("offset") or 0
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise BPError(f"'offset' must be a byte offset (a whole number >= 0), got {offset!r}")
    evs, offset = follow(run_dir, offset)
    return _jsonable({"run_dir": str(run_dir), "events": evs, "offset": offset, "active": ctl.active})


def tokens(host: Any, request: Dict[str, Any]) -> Dict[str, Any]:
    from bp_trainer.tokens.request import answer_tokens
    from bp_trainer.tokens.host_settings import prompt_settings_of

    # fields checked, work bounded (bp_trainer.tokens.request); the WebUI's emphasis/back-off/embeddings
    return _jsonable(answer_tokens(request, host.tokenizer, prompt_settings_of(host)))


def presets(host: Any, request: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    from bp_trainer.presets.preset import RECOMMENDED, SCRIPT_TITLE
    from bp_trainer.presets.store import all_presets

    path = _presets_file(host)
    items = [{"name": p.name, "builtin": p.builtin, "summary": p.summary(), **p.to_dict()} for p in all_presets(path)]
    return {"script_name": SCRIPT_TITLE.lower(), "presets_file": path, "presets": items,
            "recommended": RECOMMENDED}


def infotext(host: Any, request: Dict[str, Any]) -> Dict[str, Any]:
    from bp_trainer.infotext import parse_infotext
    from bp_trainer.presets.preset import preset_from_infotext
    from bp_trainer.presets.store import add_user_preset

    text = request.get("text")
    if not isinstance(text, str) or not text.strip():
        raise BPError("'text' (an infotext) is required")
    preset = preset_from_infotext(text, request.get("name") or "From infotext")
    result: Dict[str, Any] = {"fields": parse_infotext(text, skip_fields=[]),
                              "preset": {"name": preset.name, **preset.to_dict()}, "summary": preset.summary()}
    if request.get("save"):
        path = _presets_file(host)
        if not path:
            raise BPError("this host has no presets file to save into")
        add_user_preset(path, preset, replace=bool(request.get("replace")))
        result["saved_to"] = path
    return _jsonable(result)


def parse_credentials(text: Optional[str]) -> Dict[str, str]:
    """`user:password[,user2:password2]` (the WebUI's --api-auth format) -> {user: password}."""
    out: Dict[str, str] = {}
    for item in (text or "").split(","):
        item = item.strip()
        if item:
            user, _, password = item.partition(":")
            out[user] = password
    return out


def create_router(host: Any, *, credentials: Optional[Dict[str, str]] = None) -> Any:
    """The FastAPI router of the routes above, bound to `host`.

    With `credentials` ({user: password}; the WebUI passes its `--api-auth`), every route needs HTTP Basic auth.
    """
    from fastapi import APIRouter, Depends, HTTPException, Request

    dependencies = []
    if credentials:
        from secrets import compare_digest

        from fastapi.security import HTTPBasic, HTTPBasicCredentials

        basic = HTTPBasic()

        def check_auth(given: HTTPBasicCredentials = Depends(basic)) -> None:
            expected = credentials.get(given.username)
            if expected is None or not compare_digest(given.password.encode(), expected.encode()):
                raise HTTPException(status_code=401, detail="Incorrect username or password",
                                    headers={"WWW-Authenticate": "Basic"})

        dependencies.append(Depends(check_auth))
    router = APIRouter(prefix=PREFIX, tags=["BP Train"], dependencies=dependencies)

    def call(fn: Any, body: Optional[Dict[str, Any]]) -> Any:
        try:
            return fn(host, body or {})
        except Conflict as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        except access.Forbidden as exc:
            raise HTTPException(status_code=403, detail=str(exc)) from None
        except BPError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    async def body_of(request: Request) -> Dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            data = await request.json()
        except ValueError:
            raise HTTPException(status_code=400, detail="the request body must be JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(status_code=400, detail="the request body must be a JSON object")
        return data

    # Handlers are sync where they do blocking work: FastAPI runs them in its thread pool, so the server's
    # event loop (which also serves the gradio UI) never waits on a file, a lock or a tokenizer.
    @router.get("/status")
    def get_status() -> Any:
        return call(status, None)

    @router.post("/start", status_code=202)
    async def post_start(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        body = await body_of(request)
        return await run_in_threadpool(call, start, body)

    @router.post("/stop")
    async def post_stop(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        body = await body_of(request)
        return await run_in_threadpool(call, stop, body)

    @router.get("/events")
    def get_events(offset: int = 0, run_dir: Optional[str] = None) -> Any:
        return call(events, {"offset": offset, "run_dir": run_dir})

    @router.post("/tokens")
    async def post_tokens(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        from fastapi.responses import JSONResponse

        from bp_trainer.tokens.request import TokensBusy, oversized_body

        too_big = oversized_body(request.headers.get("content-length"))
        if too_big:
            raise HTTPException(status_code=413, detail=too_big)
        body = await body_of(request)
        try:  # the (large) JSON answer is rendered in the worker thread too, not by FastAPI on the event loop
            return await run_in_threadpool(lambda: JSONResponse(call(tokens, body)))
        except TokensBusy as exc:
            raise HTTPException(status_code=429, detail=str(exc), headers={"Retry-After": "1"}) from None

    @router.get("/presets")
    def get_presets() -> Any:
        return call(presets, None)

    @router.post("/infotext")
    async def post_infotext(request: Request) -> Any:
        from starlette.concurrency import run_in_threadpool

        body = await body_of(request)
        return await run_in_threadpool(call, infotext, body)

    return router
