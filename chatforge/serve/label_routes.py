"""The web pages and the labelling page's JSON routes.

``add_label_routes(app, ctx)`` registers:

- ``GET /``: the chat page (``static/chat.html``; it talks to ``/v1/models`` and ``/v1/chat/completions``);
- ``GET /label``: the labelling page (``static/label.html``);
- the JSON routes of the labelling page, under ``/label/api/`` (``Authorization: Bearer KEY`` when the server
  has an API key, like every ``/v1`` route):

  ========================  ======================================================================
  GET  state                counts: labels, demonstrations, candidates left, prompts; chat models
  GET  next?skip=ID...      the next unlabelled candidate (file order), or ``{"item": null}``
  GET  prompt?skip=ID...    the next prompt of the prompts file without a label, or ``{"prompt": null}``
  POST generate             ``{"prompt", "model"?, "k"?, "temperature"?, "top_p"?, "max_tokens"?, "seed"?}``:
                            k answers of a served chat model -> an item to rank
  POST rank                 ``{"prompt_id", "prompt", "answers", "ranking", "labeler"?}`` -> labels file
  POST demonstration        ``{"prompt", "answer"}`` -> demonstrations file (SFT conversations)
  ========================  ======================================================================

An item to rank is ``{"prompt_id", "prompt", "answers": [{"id", "text"}], "source"}``. A ranking is checked
against where its item came from: a candidate's prompt and answers must be the candidate's own, and a
generated item's ids must be the hashes of its prompt and answer texts (``labels.prompt_id`` /
``labels.answer_id``), so the labels file holds only what the page showed. Errors are OpenAI-shaped JSON
(``{"error": {"message", "type", "param", "code"}}``) with a 4xx status.
"""

from __future__ import annotations

import functools
import hmac
import inspect
import os
import threading
from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse

from chatforge.data.records import DataError, RecordProblem
from chatforge.serve import labels as L

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 16
"""The most answers the labelling page may ask the model for at once."""


class LabelAPIError(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code


def _error(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
           kind: Optional[str] = None) -> JSONResponse:
    kind = kind or "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def _api(fn):
    """Turn the errors a route may raise into OpenAI-shaped JSON responses (sync or async routes)."""

    def handle(e: Exception) -> JSONResponse:
        if isinstance(e, LabelAPIError):
            return _error(e.status, e.message, e.param, e.code)
        if isinstance(e, RecordProblem):
            return _error(400, e.problem)
        if isinstance(e, DataError):  # a bad labels / candidates / prompts file: the server's data, not the request
            return _error(500, str(e), kind="server_error")
        status = getattr(e, "status", None)  # the API's ServeError (unknown model, prompt past the context, ...)
        if isinstance(e, ValueError) and isinstance(status, int):
            return _error(status, getattr(e, "message", str(e)), getattr(e, "param", None), getattr(e, "code", None))
        raise e

    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def wrapped(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - mapped or re-raised
                return handle(e)
    else:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - mapped or re-raised
                return handle(e)
    return wrapped


class _Cached:
    """A file read again only when its size or modification time changes (the pipeline may rewrite it)."""

    def __init__(self, path: Optional[str], read):
        self.path, self.read = path, read
        self._stamp, self._value = None, None
        self._lock = threading.Lock()

    def get(self):
        if self.path is None:
            return None
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                self._value, self._stamp = self.read(self.path), stamp
            return self._value


def _read_prompt_file(path: str) -> list:
    from chatforge.data.prompts import read_prompts

    return [L.normalise_prompt(p.messages) for p in read_prompts(path)]


class LabelService:
    """What the labelling routes do, apart from HTTP: the store, the candidates and the prompts."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.store = L.LabelStore(ctx.labels_dir) if getattr(ctx, "labels_dir", None) else None
        self.candidates = _Cached(getattr(ctx, "candidates", None), L.read_candidates)
        self.prompts = _Cached(getattr(ctx, "prompts", None), _read_prompt_file)

    def need_store(self) -> L.LabelStore:
        if self.store is None:
            raise LabelAPIError("labelling is off: this server was started without a labels folder", 404,
                                code="labelling_off")
        return self.store

    def chat_models(self) -> list[str]:
        return [n for n, m in self.ctx.models.items() if getattr(m, "kind", "chat") == "chat"]

    def state(self) -> dict:
        store = self.need_store()
        store.labels.refresh()
        store.demonstrations.refresh()
        labelled = store.labelled_prompt_ids()
        cands = self.candidates.get()
        prompts = self.prompts.get()
        return {
            "labels": store.labels.count,
            "demonstrations": store.demonstrations.count,
            "labels_file": str(store.labels.path),
            "demonstrations_file": str(store.demonstrations.path),
            "candidates": None if cands is None else {
                "file": os.path.basename(self.candidates.path), "total": len(cands),
                "unlabelled": sum(c["prompt_id"] not in labelled for c in cands)},
            "prompts": None if prompts is None else {
                "file": os.path.basename(self.prompts.path), "total": len(prompts),
                "unlabelled": sum(L.prompt_id(p) not in labelled for p in prompts)},
            "models": self.chat_models(),
            "max_k": MAX_K,
        }

    def next_candidate(self, skip: list[str]) -> dict:
        store = self.need_store()
        cands = self.candidates.get()
        if cands is None:
            raise LabelAPIError("no candidates file: start the server with one to rank the pipeline's answers", 404,
                                code="no_candidates")
        labelled = store.labelled_prompt_ids()
        c = L.next_unlabelled(cands, labelled, skip)
        left = sum(x["prompt_id"] not in labelled for x in cands)
        return {"item": None if c is None else dict(c, source="candidates"), "unlabelled": left}

    def next_prompt(self, skip: list[str]) -> dict:
        store = self.need_store()
        prompts = self.prompts.get()
        if prompts is None:
            raise LabelAPIError("no prompts file: start the server with one, or type a prompt", 404, code="no_prompts")
        labelled, skip = store.labelled_prompt_ids(), set(skip)
        for p in prompts:
            pid = L.prompt_id(p)
            if pid not in labelled and pid not in skip:
                return {"prompt": p, "prompt_id": pid}
        return {"prompt": None, "prompt_id": None}

    async def generate(self, body: dict) -> dict:
        self.need_store()
        prompt = L.normalise_prompt(_field(body, "prompt"))
        models = self.chat_models()
        model = body.get("model") or (models[0] if models else None)
        if model is None:
            raise LabelAPIError("no chat model is served", 404, code="model_not_found")
        k = _number(body, "k", 4, int, 2, MAX_K)
        temperature = _number(body, "temperature", 1.0, float, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, float, 0.0, 1.0, low_open=True)
        max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            max_tokens = _number(body, "max_tokens", None, int, 1, 1 << 20)
        seed = body.get("seed")
        if seed is not None:
            seed = _number(body, "seed", None, int, 0, 2 ** 63 - 1)
        texts = await self.ctx.generate(model, L.prompt_messages(prompt), n=k, temperature=temperature,
                                        top_p=top_p, max_tokens=max_tokens, seed=seed)
        answers, seen, empty = [], set(), 0
        for t in texts:
            if not t.strip():
                empty += 1  # an empty answer cannot be a preference pair's side
            elif t not in seen:
                seen.add(t)
                answers.append({"id": L.answer_id(t), "text": t})
        item = {"prompt_id": L.prompt_id(prompt), "prompt": prompt, "answers": answers, "source": "model",
                "model": model}
        return {"item": item, "duplicates": len(texts) - len(answers) - empty, "empty": empty}

    def rank(self, body: dict) -> dict:
        store = self.need_store()
        pid = _field(body, "prompt_id")
        answers = L.check_answers(_field(body, "answers"))
        labeler = body.get("labeler") or None
        if labeler is not None and not isinstance(labeler, str):
            raise LabelAPIError("'labeler' must be a string", param="labeler")
        cands = self.candidates.get() or []
        cand = next((c for c in cands if c["prompt_id"] == pid), None)
        if cand is not None:
            prompt = cand["prompt"]
            if _field(body, "prompt") != prompt:
                raise LabelAPIError(f"the prompt differs from candidate {pid!r} of the candidates file", param="prompt")
            own = {a["id"]: a["text"] for a in cand["answers"]}
            for a in answers:
                if own.get(a["id"]) != a["text"]:
                    raise LabelAPIError(f"answer {a['id']!r} is not one of candidate {pid!r}'s answers", param="answers")
            answers = cand["answers"]  # the record keeps the candidate's answers as the file has them
        else:
            prompt = L.normalise_prompt(_field(body, "prompt"))
            if pid != L.prompt_id(prompt):
                raise LabelAPIError(f"unknown prompt_id {pid!r}: neither a candidate nor the hash of the prompt",
                                    param="prompt_id")
            for a in answers:
                if a["id"] != L.answer_id(a["text"]):
                    raise LabelAPIError(f"answer id {a['id']!r} is not the hash of its text", param="answers")
        done = store.add_ranking(pid, prompt, answers, _field(body, "ranking"), labeler=labeler)
        return {"stored": done.stored, "labels": store.labels.count, "record": done.record}

    def demonstration(self, body: dict) -> dict:
        store = self.need_store()
        done = store.add_demonstration(_field(body, "prompt"), _field(body, "answer"))
        return {"stored": done.stored, "demonstrations": store.demonstrations.count}


def _field(body: dict, name: str) -> Any:
    if name not in body:
        raise LabelAPIError(f"missing field '{name}'", param=name)
    return body[name]


def _number(body: dict, name: str, default, kind, lo, hi, low_open: bool = False):
    x = body.get(name, default)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (kind is int and int(x) != x):
        raise LabelAPIError(f"'{name}' must be {'an integer' if kind is int else 'a number'}, got {x!r}", param=name)
    if x < lo or x > hi or (low_open and x == lo):
        raise LabelAPIError(f"'{name}' must be in {'(' if low_open else '['}{lo}, {hi}], got {x}", param=name)
    return kind(x)


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except Exception:  # noqa: BLE001 - any undecodable body
        raise LabelAPIError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise LabelAPIError("the request body must be a JSON object")
    return body


def _check_key(ctx, request: Request) -> None:
    """The API's rule: ``Authorization: Bearer KEY`` when the server has a key (401 otherwise)."""
    key = getattr(ctx, "api_key", None)
    if not key:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise LabelAPIError("You didn't provide an API key. Send it in an Authorization header as 'Bearer KEY'",
                            401, code="missing_api_key")
    if not hmac.compare_digest(given.strip().encode(), key.encode()):
        raise LabelAPIError("Incorrect API key provided", 401, code="invalid_api_key")


def add_label_routes(app: FastAPI, ctx) -> LabelService:
    """Register ``/``, ``/label`` and ``/label/api/*`` on ``app`` (see the module docstring).

    Opens the label store now (a bad labels file raises DataError naming file and line)."""
    svc = LabelService(ctx)
    app.state.label_service = svc

    @app.get("/", include_in_schema=False)
    def chat_page():
        return FileResponse(STATIC / "chat.html", media_type="text/html")

    @app.get("/label", include_in_schema=False)
    def label_page():
        return FileResponse(STATIC / "label.html", media_type="text/html")

    @app.get("/label/api/state")
    @_api
    def state(request: Request):
        _check_key(ctx, request)
        return svc.state()

    @app.get("/label/api/next")
    @_api
    def next_candidate(request: Request):
        _check_key(ctx, request)
        return svc.next_candidate(request.query_params.getlist("skip"))

    @app.get("/label/api/prompt")
    @_api
    def next_prompt(request: Request):
        _check_key(ctx, request)
        return svc.next_prompt(request.query_params.getlist("skip"))

    @app.post("/label/api/generate")
    @_api
    async def generate(request: Request):
        _check_key(ctx, request)
        return await svc.generate(await _json_body(request))

    @app.post("/label/api/rank")
    @_api
    async def rank(request: Request):
        _check_key(ctx, request)
        body = await _json_body(request)
        return await _in_thread(svc.rank, body)  # fsync off the event loop

    @app.post("/label/api/demonstration")
    @_api
    async def demonstration(request: Request):
        _check_key(ctx, request)
        body = await _json_body(request)
        return await _in_thread(svc.demonstration, body)

    return svc


async def _in_thread(fn, *args):
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
