"""Read and check the JSON bodies of the OpenAI-style routes; every problem is a :class:`ServeError`
(HTTP 400) whose message names the field and what is wrong with it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from chatforge.serve.context import ServeError

MAX_N = 64
MAX_STOP = 4
MAX_TOP_LOGPROBS = 20


def _bad(param: str, message: str) -> ServeError:
    return ServeError(f"'{param}': {message}", 400, param=param, code="invalid_value")


def _number(body: dict, key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(key, f"expected a number, got {type(v).__name__} {v!r:.40}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise _bad(key, f"{v} is out of range; it must be {'>' if lo_open else '>='} {lo} and <= {hi}")
    return float(v)


def _int(body: dict, key: str, default: Optional[int], lo: int, hi: Optional[int] = None) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _bad(key, f"expected an integer, got {type(v).__name__} {v!r:.40}")
    if v < lo or (hi is not None and v > hi):
        raise _bad(key, f"{v} is out of range; it must be >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
    return v


def read_bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(key, f"expected true or false, got {v!r:.40}")
    return v


def _stop(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _bad("stop", "expected a string or a list of strings")
    if len(v) > MAX_STOP:
        raise _bad("stop", f"at most {MAX_STOP} stop strings, got {len(v)}")
    return [s for s in v if s]


@dataclass
class Sampling:
    """What both generation routes share."""

    model: Optional[str]
    temperature: float
    top_p: float
    max_tokens: Optional[int]
    """None: as many as the context leaves."""
    stop: list[str]
    seed: Optional[int]
    n: int
    stream: bool
    include_usage: bool
    max_tokens_param: str = "max_tokens"


def read_sampling(body: dict, *, default_max_tokens: Optional[int], min_max_tokens: int) -> Sampling:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"expected the model's id as a string, got {type(model).__name__}")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stream = read_bool(body, "stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise _bad("stream_options", "expected an object like {\"include_usage\": true}")
    return Sampling(
        model=model,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        max_tokens=_int(body, key, default_max_tokens, min_max_tokens),
        stop=_stop(body),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
        n=_int(body, "n", 1, 1, MAX_N),
        stream=stream,
        include_usage=bool(opts and read_bool(opts, "include_usage")),
        max_tokens_param=key,
    )


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if c is None and m.get("role") == "assistant":
        return ""
    if isinstance(c, list):  # content parts: only text parts are understood
        parts = []
        for j, p in enumerate(c):
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise _bad(f"messages[{i}].content[{j}]", "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                                         "are supported")
            parts.append(p["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", f"expected a string, got {type(c).__name__}")


def read_messages(body: dict) -> list[dict]:
    """The ``messages`` of a chat request as [{role, content}] (``developer`` is read as ``system``)."""
    msgs = body.get("messages")
    if msgs is None:
        raise ServeError("'messages' is required: a list of {\"role\": ..., \"content\": ...}", 400,
                         param="messages", code="missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "expected a non-empty list of {\"role\": ..., \"content\": ...}")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"expected an object with 'role' and 'content', got {m!r:.40}")
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role", f"{m.get('role')!r} is not a supported role "
                                               "(system, developer, user or assistant)")
        out.append({"role": role, "content": _content(m, i)})
    return out


Prompt = Union[str, list[int]]


def read_prompts(body: dict, vocab_size: int) -> list[Prompt]:
    """The ``prompt`` of a completions request: a string, a list of strings, a list of token ids, or a list of
    lists of token ids -> one entry per prompt."""
    p = body.get("prompt")
    if p is None:
        raise ServeError("'prompt' is required: a string, a list of strings, or token ids", 400, param="prompt",
                         code="missing_required_parameter")
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        prompts = [p]
    elif isinstance(p, list) and p:
        prompts = p
    else:
        raise _bad("prompt", "expected a string, a non-empty list of strings, or (lists of) token ids")
    out: list[Prompt] = []
    for i, q in enumerate(prompts):
        if isinstance(q, str):
            out.append(q)
        elif isinstance(q, list) and q and all(isinstance(t, int) and not isinstance(t, bool) for t in q):
            bad = [t for t in q if not 0 <= t < vocab_size]
            if bad:
                raise _bad("prompt", f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
            out.append(list(q))
        else:
            raise _bad(f"prompt[{i}]" if len(prompts) > 1 else "prompt",
                       "expected a string or a non-empty list of token ids")
    return out


@dataclass
class Logprobs:
    """Which log-probs a request wants: ``on`` and the number of alternatives per token."""

    on: bool = False
    top: int = 0
    extra: dict = field(default_factory=dict)


def read_chat_logprobs(body: dict) -> Logprobs:
    on = read_bool(body, "logprobs")
    top = _int(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    if top and not on:
        raise _bad("top_logprobs", "needs \"logprobs\": true")
    return Logprobs(on, top)


def read_completion_logprobs(body: dict) -> Logprobs:
    v = body.get("logprobs")
    if v is None or v is False:
        return Logprobs(False, 0)
    top = _int(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS)
    return Logprobs(True, top)
