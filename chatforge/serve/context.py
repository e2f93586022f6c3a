"""What every route of the server sees: the served models and the server's settings.

``create_app`` builds one :class:`ServeContext`; the API routes and the web pages read it::

    ctx.models["sft"].kind                     # "chat" (a causal LM) or "reward" (an rm/ directory)
    ctx.labels_dir, ctx.candidates, ctx.prompts, ctx.api_key
    answers = await ctx.generate("sft", [{"role": "user", "content": "Hi"}], n=4, temperature=1.0)

A chat model's requests go through its :class:`~chatforge.scheduler.Scheduler` (continuous batching),
so ``generate`` can be awaited from any number of routes at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional, Sequence

from chatforge.generation_request import Request, RequestEvent
from chatforge.scheduler import Scheduler
from chatforge.tokenizer import ChatTokenizer, render_prompt


class ServeError(ValueError):
    """A request the server refuses: ``status`` is the HTTP code, ``kind``/``param``/``code`` OpenAI's error fields."""

    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.kind, self.param, self.code = message, status, kind, param, code


@dataclass
class ServedModel:
    """One model directory behind the server."""

    name: str
    """The id clients pass as ``model``."""
    path: str
    """The model directory it was loaded from."""
    kind: str
    """"chat" (a causal LM, served by /v1/chat/completions and /v1/completions) or "reward" (/v1/score)."""
    tokenizer: ChatTokenizer
    context_length: int
    """Tokens of prompt + answer the model takes (its block_size)."""
    model: Any
    """The torch module (GPT, HFCausalLM, ScalarModel, HFScalarModel)."""
    scheduler: Optional[Scheduler] = None
    """A chat model's continuous-batching scheduler (None for reward models)."""
    scorer: Any = None
    """A reward model's :class:`~chatforge.rl.reward.RewardModelScorer` (None for chat models)."""
    normalized: bool = False
    """Reward models: True when the directory holds the rm stage's score statistics (normalised scores)."""
    created: int = field(default_factory=lambda: int(time.time()))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """Serialises a reward model's scoring (chat models go through their scheduler)."""

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end an answer: the end-of-turn token and <|endoftext|>."""
        return [self.tokenizer.end_id, self.tokenizer.eot_id]


class _LoopBridge:
    """Hands events from scheduler threads to one event loop's queues with one wake-up of the loop per batch of
    events (a decode step emits an event per active request) instead of one per event."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, RequestEvent]] = []

    def push(self, queue: asyncio.Queue, ev: RequestEvent) -> None:  # any thread
        with self.lock:
            self.pending.append((queue, ev))
            wake = len(self.pending) == 1
        if wake:
            try:
                self.loop.call_soon_threadsafe(self._drain)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _drain(self) -> None:  # on the loop
        with self.lock:
            items, self.pending = self.pending, []
        for queue, ev in items:
            queue.put_nowait(ev)


_BRIDGES: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopBridge]" = weakref.WeakKeyDictionary()


def _bridge(loop: asyncio.AbstractEventLoop) -> _LoopBridge:
    b = _BRIDGES.get(loop)
    if b is None:
        b = _BRIDGES[loop] = _LoopBridge(loop)
    return b


async def stream_events(scheduler: Scheduler, request: Request) -> AsyncIterator[RequestEvent]:
    """Submit ``request`` and yield its events (one per new token, the last one has ``finish`` set) as the
    scheduler thread produces them. Leaving the loop early (a client that went away) cancels the request, which
    frees its KV-cache slot at the scheduler's next step."""
    bridge = _bridge(asyncio.get_running_loop())
    queue: asyncio.Queue = asyncio.Queue()

    def push(ev: RequestEvent) -> None:  # called on the scheduler thread
        bridge.push(queue, ev)

    handle = scheduler.submit(request, push)
    finished = False
    try:
        while True:
            ev = await queue.get()
            if ev.error is not None:
                finished = True
                raise RuntimeError(ev.error)
            yield ev
            if ev.finish is not None:
                finished = True
                return
    finally:
        if not finished:
            handle.cancel()


class ServeContext:
    """The served models (name -> :class:`ServedModel`) and the server's settings."""

    def __init__(self, models: dict[str, ServedModel], *, api_key: Optional[str] = None,
                 labels_dir: Optional[str] = None, candidates: Optional[str] = None,
                 prompts: Optional[str] = None):
        self.models = models
        self.api_key = api_key
        self.labels_dir = labels_dir
        self.candidates = candidates
        self.prompts = prompts

    def chat_models(self) -> list[str]:
        """Names of the models that generate text, in the order given."""
        return [n for n, m in self.models.items() if m.kind == "chat"]

    def get(self, name: Optional[str], kind: Optional[str] = None) -> ServedModel:
        """The model called ``name`` (None: the only/first model of ``kind``), or a 404 ServeError."""
        if name is None or name == "":
            names = [n for n, m in self.models.items() if kind is None or m.kind == kind]
            if not names:
                raise ServeError(f"no {kind or ''} model is served".replace("  ", " "), 404, code="model_not_found")
            return self.models[names[0]]
        m = self.models.get(name)
        if m is None:
            raise ServeError(f"The model '{name}' does not exist; this server serves "
                             f"{', '.join(repr(n) for n in self.models) or 'no models'}", 404,
                             param="model", code="model_not_found")
        if kind is not None and m.kind != kind:
            what = {"chat": "a chat (causal LM)", "reward": "a reward"}[kind]
            raise ServeError(f"The model '{name}' is a {m.kind} model, not {what} model", 400, param="model",
                             code="wrong_model_kind")
        return m

    async def generate(self, model_name: str, messages: Sequence[dict], n: int = 1, temperature: float = 1.0,
                       top_p: float = 1.0, max_tokens: Optional[int] = None, seed: Optional[int] = None) -> list[str]:
        """``n`` answers of chat model ``model_name`` to ``messages`` (the chat format's rendering), as text.

        The i-th answer is sampled with seed ``seed + i`` (None: random). ``max_tokens`` None = up to the context.
        Raises :class:`ServeError` for an unknown model, a bad conversation or a prompt past the context."""
        m = self.get(model_name, "chat")
        if not (isinstance(n, int) and 1 <= n <= 64):
            raise ServeError(f"'n': expected an integer from 1 to 64, got {n!r}", param="n", code="invalid_value")
        if not 0.0 <= float(temperature) <= 2.0:
            raise ServeError(f"'temperature': {temperature} is out of range [0, 2]", param="temperature",
                             code="invalid_value")
        if not 0.0 < float(top_p) <= 1.0:
            raise ServeError(f"'top_p': {top_p} is out of range (0, 1]", param="top_p", code="invalid_value")
        if max_tokens is not None and int(max_tokens) < 1:
            raise ServeError(f"'max_tokens': {max_tokens} must be >= 1", param="max_tokens", code="invalid_value")
        try:
            prompt = render_prompt(m.tokenizer, list(messages))
        except ValueError as e:
            raise ServeError(f"'messages': {e}", param="messages", code="invalid_value") from None
        room = m.context_length - len(prompt)
        if room <= 0:
            raise ServeError(f"the conversation is {len(prompt)} tokens long; the context of model '{m.name}' holds "
                             f"{m.context_length} tokens, so it takes at most {m.context_length - 1} prompt tokens",
                             param="messages", code="context_length_exceeded")
        new = room if max_tokens is None else min(int(max_tokens), room)

        async def one(i: int) -> str:
            req = Request(prompt=prompt, max_new_tokens=new, temperature=temperature, top_p=top_p,
                          seed=None if seed is None else seed + i, stop_ids=m.stop_ids)
            ids: list[int] = []
            async for ev in stream_events(m.scheduler, req):
                if ev.token is not None and ev.token not in m.stop_ids:
                    ids.append(ev.token)
            return m.tokenizer.decode(ids, skip_special=True)

        return list(await asyncio.gather(*(one(i) for i in range(n))))

    def close(self) -> None:
        """Stop every scheduler thread."""
        for m in self.models.values():
            if m.scheduler is not None:
                m.scheduler.close()
