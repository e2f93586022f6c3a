"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, /v1/score, /health.

Chat prompts are rendered in the model's chat format (tokenizer.render_prompt). A text prompt of
/v1/completions is read as a document, as in pretraining: <|endoftext|> (BOS) goes in front, so every
prompt token gets a log-prob with ``echo``; a token-id prompt is used exactly as given (its first token's
log-prob is null). Log-probs are those of the model's own distribution (log_softmax of its logits).
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Optional

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from chatforge.generation_request import Request
from chatforge.row_sampling import prompt_logprobs
from chatforge.serve.context import ServedModel, ServeContext, ServeError
from chatforge.serve.generation import Piece, TokenInfo, answer_pieces, merge, token_bytes, token_text
from chatforge.serve.params import (Logprobs, read_bool, read_chat_logprobs, read_completion_logprobs,
                                    read_messages, read_prompts, read_sampling)
from chatforge.tokenizer import ConversationError, render_prompt, render_response


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(e: ServeError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)


async def read_json(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        msg = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise ServeError(f"the request body is not valid JSON{where}: {msg}", 400, code="invalid_json") from None
    if not isinstance(body, dict):
        raise ServeError(f"the request body must be a JSON object, got {type(body).__name__}", 400,
                         code="invalid_json")
    return body


def check_api_key(ctx: ServeContext, request: HTTPRequest) -> None:
    if ctx.api_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ServeError("You didn't provide an API key. Send it in an Authorization header as 'Bearer KEY' "
                         "(the key given to `chatforge serve --api-key`)", 401, code="missing_api_key")
    if not secrets.compare_digest(key.strip().encode(), ctx.api_key.encode()):
        raise ServeError("Incorrect API key provided. Use the key given to `chatforge serve --api-key`", 401,
                         code="invalid_api_key")


def _new_tokens(m: ServedModel, prompt_len: int, max_tokens: Optional[int], param: str, what: str,
                explicit: bool = True) -> int:
    """How many tokens to generate, or a 400 when the prompt (or prompt + max_tokens) exceeds the context."""
    C = m.context_length
    if prompt_len > C or (prompt_len == C and (max_tokens is None or max_tokens > 0)):
        raise ServeError(f"This model's maximum context length is {C} tokens. However, your {what} resulted in "
                         f"{prompt_len} tokens, which leaves no room for an answer. Please reduce the length of "
                         f"the {what}.", 400, param="messages" if what == "messages" else "prompt",
                         code="context_length_exceeded")
    if max_tokens is None:
        return C - prompt_len
    if prompt_len + max_tokens > C:
        if not explicit:
            return C - prompt_len
        raise ServeError(f"This model's maximum context length is {C} tokens. However, you requested "
                         f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} in the "
                         f"completion). Please reduce the length of the {what} or '{param}' (at most "
                         f"{C - prompt_len} here).", 400, param=param, code="context_length_exceeded")
    return max_tokens


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# ----------------------------------------------------------------------------- log-probs in OpenAI's shapes


def chat_logprob_entries(tok, tokens: list[TokenInfo], top: int) -> list[dict]:
    """Chat ``logprobs.content`` entries."""
    def entry(i: int, lp: float) -> dict:
        return {"token": token_text(tok, i), "logprob": lp, "bytes": list(token_bytes(tok, i))}

    return [{**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in (t.top or [])[:top]]}
            for t in tokens]


def completion_logprobs(tok, tokens: list[TokenInfo], top: int, offset: int) -> dict:
    """Completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset (from ``offset``)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        s = token_text(tok, t.id)
        out["tokens"].append(s)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append(None if t.top is None else {token_text(tok, i): lp for i, lp in t.top[:top]})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


# ----------------------------------------------------------------------------- the routes


def add_openai_routes(app: FastAPI, ctx: ServeContext) -> None:
    """Register the API routes on ``app``."""

    @app.get("/health")
    async def health() -> dict:
        return handle_health(ctx)

    @app.get("/v1/models")
    async def list_models(request: HTTPRequest) -> dict:
        return handle_list_models(ctx, request)

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: HTTPRequest) -> dict:
        return handle_get_model(ctx, name, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await handle_chat_completions(ctx, request)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await handle_completions(ctx, request)

    @app.post("/v1/score")
    async def score(request: HTTPRequest):
        """Reward-model scores: {"model", "prompt": str | messages, "responses": [str, ...]} (or "response")."""
        return await handle_score(ctx, request)


def handle_health(ctx: ServeContext) -> dict:
    """GET /health: the served models and each one's requests (active, waiting, finished, cancelled)."""
    load = {n: {"active": m.scheduler.num_active, "waiting": m.scheduler.num_waiting,
                "finished": m.scheduler.finished, "cancelled": m.scheduler.cancelled}
            for n, m in ctx.models.items() if m.scheduler is not None}
    return {"status": "ok", "models": list(ctx.models), "requests": load}


def handle_list_models(ctx: ServeContext, request: HTTPRequest) -> dict:
    """GET /v1/models: every served model."""
    check_api_key(ctx, request)
    return {"object": "list", "data": [
        {"id": m.name, "object": "model", "created": m.created, "owned_by": "chatforge", "kind": m.kind,
         "context_length": m.context_length, "root": m.path} for m in ctx.models.values()]}


def handle_get_model(ctx: ServeContext, name: str, request: HTTPRequest) -> dict:
    """GET /v1/models/{name}: one served model."""
    check_api_key(ctx, request)
    m = ctx.get(name)
    return {"id": m.name, "object": "model", "created": m.created, "owned_by": "chatforge", "kind": m.kind,
            "context_length": m.context_length, "root": m.path}


async def handle_chat_completions(ctx: ServeContext, request: HTTPRequest):
    """POST /v1/chat/completions: answers to a conversation (streamed as server-sent events when asked)."""
    check_api_key(ctx, request)
    body = await read_json(request)
    sp = read_sampling(body, default_max_tokens=None, min_max_tokens=1)
    messages = read_messages(body)
    lp = read_chat_logprobs(body)
    m = ctx.get(sp.model, "chat")
    try:
        prompt = render_prompt(m.tokenizer, messages)
    except ConversationError as e:
        raise ServeError(f"'messages': {e}", 400, param="messages", code="invalid_value") from None
    new = _new_tokens(m, len(prompt), sp.max_tokens, sp.max_tokens_param, "messages")
    reqs = [Request(prompt=prompt, max_new_tokens=new, temperature=sp.temperature, top_p=sp.top_p,
                    seed=None if sp.seed is None else sp.seed + i, stop_ids=m.stop_ids, top_logprobs=lp.top)
            for i in range(sp.n)]
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if sp.stream:
        return _stream(_chat_chunks(m, reqs, sp.stop, lp, cid, created, len(prompt), sp.include_usage))
    texts, tokens, finishes = await _run_all(m, reqs, sp.stop)
    choices = []
    for i in range(sp.n):
        choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                        "logprobs": {"content": chat_logprob_entries(m.tokenizer, tokens[i], lp.top)}
                        if lp.on else None,
                        "finish_reason": finishes[i]})
    return {"id": cid, "object": "chat.completion", "created": created, "model": m.name, "choices": choices,
            "usage": _usage(len(prompt), sum(len(t) for t in tokens))}


async def handle_completions(ctx: ServeContext, request: HTTPRequest):
    """POST /v1/completions: continuations of raw prompts (text or token ids), optionally echoed with log-probs."""
    check_api_key(ctx, request)
    body = await read_json(request)
    explicit = body.get("max_tokens") is not None
    sp = read_sampling(body, default_max_tokens=16, min_max_tokens=0)
    lp = read_completion_logprobs(body)
    echo = read_bool(body, "echo")
    m = ctx.get(sp.model, "chat")
    tok = m.tokenizer
    jobs = []  # per prompt: (ids fed to the model, echoed ids, echoed text, new tokens)
    for p in read_prompts(body, tok.vocab_size):
        if isinstance(p, str):
            ids = [tok.bos_id] + tok.encode(p)
            shown, text = ids[1:], p
        else:
            ids, shown, text = p, p, tok.decode(p)
        new = _new_tokens(m, len(ids), sp.max_tokens, "max_tokens", "prompt", explicit)
        jobs.append((ids, shown, text, new))
    reqs = [Request(prompt=ids, max_new_tokens=new, temperature=sp.temperature, top_p=sp.top_p,
                    seed=None if sp.seed is None else sp.seed + j, stop_ids=m.stop_ids, top_logprobs=lp.top)
            for ids, _, _, new in jobs for j in range(sp.n)]
    echoed: list[list[TokenInfo]] = []
    if echo and lp.on:
        for ids, shown, _, _ in jobs:
            lps, tops = await run_in_threadpool(m.scheduler.call, lambda ids=ids: prompt_logprobs(
                m.model, ids, lp.top))
            echoed.append([TokenInfo(i, a, b) for i, a, b in zip(ids, lps, tops)][len(ids) - len(shown):])
    else:
        echoed = [[TokenInfo(i, None) for i in shown] for _, shown, _, _ in jobs]
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    prompt_tokens = sum(len(ids) for ids, _, _, _ in jobs)
    heads = [(jobs[k // sp.n][2] if echo else "", echoed[k // sp.n] if echo else []) for k in range(len(reqs))]
    if sp.stream:
        return _stream(_completion_chunks(m, reqs, sp.stop, lp, heads, cid, created, prompt_tokens,
                                          sp.include_usage))
    active = [k for k, r in enumerate(reqs) if r.max_new_tokens > 0]
    texts, tokens, finishes = ([""] * len(reqs), [[] for _ in reqs], ["length"] * len(reqs))
    if active:
        t, tk, f = await _run_all(m, [reqs[k] for k in active], sp.stop)
        for j, k in enumerate(active):
            texts[k], tokens[k], finishes[k] = t[j], tk[j], f[j]
    choices = []
    for k in range(len(reqs)):
        head_text, head_tokens = heads[k]
        logprobs = None
        if lp.on:
            logprobs = completion_logprobs(tok, head_tokens + tokens[k], lp.top, 0)
        choices.append({"index": k, "text": head_text + texts[k], "logprobs": logprobs,
                        "finish_reason": finishes[k]})
    return {"id": cid, "object": "text_completion", "created": created, "model": m.name, "choices": choices,
            "usage": _usage(prompt_tokens, sum(len(t) for t in tokens))}


async def handle_score(ctx: ServeContext, request: HTTPRequest):
    """POST /v1/score: reward-model scores of responses to one prompt."""
    """Reward-model scores: {"model", "prompt": str | messages, "responses": [str, ...]} (or "response")."""
    check_api_key(ctx, request)
    body = await read_json(request)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ServeError("'model': expected the model's id as a string", 400, param="model", code="invalid_value")
    m = ctx.get(model, "reward")
    p = body.get("prompt")
    if isinstance(p, str):
        messages = [{"role": "user", "content": p}]
    elif isinstance(p, list):
        messages = read_messages({"messages": p})
    else:
        raise ServeError("'prompt' is required: the user message (a string) or a list of messages", 400,
                         param="prompt", code="missing_required_parameter")
    responses = body.get("responses", [body["response"]] if "response" in body else None)
    if not isinstance(responses, list) or not responses or not all(isinstance(r, str) for r in responses):
        raise ServeError("'responses' is required: a non-empty list of answers (strings) to score", 400,
                         param="responses", code="missing_required_parameter")
    tok = m.tokenizer
    try:
        p_ids = render_prompt(tok, messages)
        r_ids = [render_response(tok, r) for r in responses]
    except ConversationError as e:
        raise ServeError(f"{e}", 400, param="responses" if "assistant" in str(e) else "prompt",
                         code="invalid_value") from None
    for i, r in enumerate(r_ids):
        if len(p_ids) + len(r) > m.context_length:
            raise ServeError(f"This model's maximum context length is {m.context_length} tokens. However, the "
                             f"prompt and response {i} make {len(p_ids) + len(r)} tokens. Please shorten them.",
                             400, param="responses", code="context_length_exceeded")
    raw, norm = await run_in_threadpool(_score_locked, m, [p_ids] * len(r_ids), r_ids)
    return {"object": "list", "model": m.name, "normalized": m.normalized, "data": [
        {"object": "score", "index": i, "score": n, "raw_score": r}
        for i, (r, n) in enumerate(zip(raw.tolist(), norm.tolist()))]}


def _score_locked(m: ServedModel, p_ids, r_ids):
    """A reward model's scores, one request at a time (it has no scheduler)."""
    with m.lock, torch.inference_mode():
        return m.scorer.score_ids(p_ids, r_ids)


async def _run_all(m: ServedModel, reqs: list[Request], stop: list[str]
                   ) -> tuple[list[str], list[list[TokenInfo]], list[str]]:
    """Run requests together; (texts, tokens, finish reasons)."""
    texts, tokens, finishes = [""] * len(reqs), [[] for _ in reqs], ["length"] * len(reqs)
    async for i, piece in merge([answer_pieces(m, r, stop) for r in reqs]):
        texts[i] += piece.text
        tokens[i] += piece.tokens
        if piece.finish is not None:
            finishes[i] = piece.finish
    return texts, tokens, finishes


def _stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _guarded(gen: AsyncIterator[tuple[int, Piece]]) -> AsyncIterator[tuple[int, Any]]:
    """Pieces, or one (-1, error message) when the model failed after the response had started."""
    try:
        async for x in gen:
            yield x
    except RuntimeError as e:
        yield -1, str(e)


async def _chat_chunks(m: ServedModel, reqs: list[Request], stop: list[str], lp: Logprobs, cid: str, created: int,
                       prompt_tokens: int, include_usage: bool) -> AsyncIterator[str]:
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": m.name}
    extra = {"usage": None} if include_usage else {}
    for i in range(len(reqs)):
        yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], **extra})
    completion_tokens = 0
    held = ""  # a choice's last events, written together with the next ones (fewer writes per answer)
    async with aclosing(merge([answer_pieces(m, r, stop) for r in reqs])) as pieces:
        async for i, piece in _guarded(pieces):
            if i < 0:
                yield held + _sse(error_body(piece, "server_error")) + "data: [DONE]\n\n"
                return
            completion_tokens += len(piece.tokens)
            logprobs = {"content": chat_logprob_entries(m.tokenizer, piece.tokens, lp.top)} if lp.on else None
            out = ""
            if piece.text or (lp.on and piece.tokens):
                out += _sse({**base, "choices": [{"index": i, "delta": {"content": piece.text}, "logprobs": logprobs,
                                                  "finish_reason": None}], **extra})
            if piece.finish is not None:
                held += out + _sse({**base, "choices": [{"index": i, "delta": {}, "logprobs": None,
                                                         "finish_reason": piece.finish}], **extra})
            elif out:
                yield held + out
                held = ""
    if include_usage:
        held += _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield held + "data: [DONE]\n\n"


async def _completion_chunks(m: ServedModel, reqs: list[Request], stop: list[str], lp: Logprobs,
                             heads: list[tuple[str, list[TokenInfo]]], cid: str, created: int, prompt_tokens: int,
                             include_usage: bool) -> AsyncIterator[str]:
    base = {"id": cid, "object": "text_completion", "created": created, "model": m.name}
    extra = {"usage": None} if include_usage else {}
    offsets = [0] * len(reqs)

    def chunk(k: int, text: str, tokens: list[TokenInfo], finish: Optional[str]) -> str:
        logprobs = completion_logprobs(m.tokenizer, tokens, lp.top, offsets[k]) if lp.on else None
        offsets[k] += len(text)
        return _sse({**base, "choices": [{"index": k, "text": text, "logprobs": logprobs, "finish_reason": finish}],
                     **extra})

    for k, (text, tokens) in enumerate(heads):
        if reqs[k].max_new_tokens == 0:
            yield chunk(k, text, tokens, "length")
        elif text or tokens:
            yield chunk(k, text, tokens, None)
    live = [k for k, r in enumerate(reqs) if r.max_new_tokens > 0]
    completion_tokens = 0
    async with aclosing(merge([answer_pieces(m, reqs[k], stop) for k in live])) as pieces:
        async for j, piece in _guarded(pieces):
            if j < 0:
                yield _sse(error_body(piece, "server_error"))
                yield "data: [DONE]\n\n"
                return
            completion_tokens += len(piece.tokens)
            if piece.text or piece.finish is not None or (lp.on and piece.tokens):
                yield chunk(live[j], piece.text, piece.tokens, piece.finish)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    yield "data: [DONE]\n\n"

