"""A generation request of the scheduler and what comes back: :class:`Request` (token ids in, sampling
settings), :class:`RequestEvent` (one new token or the end) and :class:`RequestHandle` (a submitted request:
its tokens so far, cancel, wait)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch


@dataclass
class Request:
    """One generation request (token ids in, token ids out)."""

    prompt: Sequence[int]
    """The prompt ids (at least one)."""
    max_new_tokens: int
    """At most this many new tokens (capped so prompt + answer fit the model's context)."""
    temperature: float = 1.0
    """0 = greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens until their mass reaches top_p (1 = all)."""
    seed: Optional[int] = None
    """Seed of this request's sampling generator (None: drawn from the scheduler's generator)."""
    stop_ids: Sequence[int] = ()
    """Ids that end the answer (the stop id is emitted, with finish "stop")."""
    top_logprobs: int = 0
    """Also report the this-many most likely tokens (id, log-prob) at each step."""


@dataclass
class RequestEvent:
    """One new token of a request, or the end of it."""

    token: Optional[int] = None
    logprob: Optional[float] = None
    """log_softmax(logits)[token], fp32."""
    top: Optional[list[tuple[int, float]]] = None
    """The ``top_logprobs`` most likely (id, log-prob), when asked."""
    finish: Optional[str] = None
    """None while running; then "stop" (a stop id), "length" (max_new_tokens) or "cancelled"."""
    error: Optional[str] = None
    """Set when the model failed on this request (the request is over)."""


class RequestHandle:
    """A submitted request: its tokens so far, :meth:`cancel`, and :meth:`wait` for the end."""

    def __init__(self, rid: int, request: Request, on_event: Optional[Callable[[RequestEvent], None]]):
        self.id = rid
        self.request = request
        self.on_event = on_event
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.finish: Optional[str] = None
        self.error: Optional[str] = None
        self.cancelled = False
        self._done = threading.Event()
        # set by the scheduler
        self.generator: Optional[torch.Generator] = None
        self.row: Optional[int] = None
        self.cache: Any = None  # per-request cache (generic backend)
        self.pending: Optional[int] = None  # the last sampled token, not yet fed to the model
        self.max_new = 0

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (its row is freed at the next step)."""
        self.cancelled = True

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: Optional[float] = None) -> "RequestHandle":
        """Block until the request is over (raises TimeoutError after ``timeout`` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self

    def _emit(self, ev: RequestEvent) -> None:
        if ev.token is not None:
            self.tokens.append(ev.token)
            self.logprobs.append(ev.logprob)
        if ev.finish is not None or ev.error is not None:
            self.finish, self.error = ev.finish, ev.error
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a consumer that went away must not stop the batch
                self.cancelled = True
        if ev.finish is not None or ev.error is not None:
            self._done.set()
