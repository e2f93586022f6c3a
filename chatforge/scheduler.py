"""Continuous batching: one scheduler owns a causal LM and runs one decode step at a time over every
active request. It knows only token ids (like :mod:`chatforge.engine`).

Each :meth:`Scheduler.step`:

1. drops cancelled requests (their KV-cache rows are freed at once);
2. admits waiting requests into free rows: their prompts are prefilled together (left-padded, one
   forward) and the first new token of each is sampled from the prefill logits;
3. decodes one token for every other active request in one batched forward;
4. emits each new token to its request; a request that produced a stop id or reached its
   ``max_new_tokens`` leaves the batch and frees its row.

Two backends:

- the native GPT (fast path): a :class:`SlotCache` holds up to ``max_batch`` rows of keys/values.
  Rows join and leave at any step: the cache looks like :class:`~chatforge.model.inference.KVCache` to the
  model (every row writes its next token at the shared slot ``length``; a row's own tokens are the slots
  marked ``valid``), so the model file knows nothing of serving. Slot order inside a row does not matter
  when decoding (RoPE is applied before caching; every valid slot is in the past), which lets a joining
  row's prompt sit anywhere before ``length`` and lets :meth:`SlotCache.compact` squeeze out the slots
  of departed tokens when ``length`` reaches the end of the storage.
- any other model with ``make_cache`` (e.g. a transformers model through ``HFCausalLM``): one cache
  per request, decoded one request after the other inside the step. Correct and simple; not batched.

Sampling follows :func:`chatforge.engine.sample_next` row by row (temperature 0 = greedy; top-p nucleus;
one uniform per row drawn from the request's own ``torch.Generator`` seeded with its ``seed``), so a
request's tokens do not depend on which other requests share its steps. Reported log-probs are those of
the model's own distribution, ``log_softmax(logits)`` in fp32 (untempered).

Run it on its own thread (:meth:`start`; :meth:`submit` from any thread, events arrive through the
callback on the scheduler thread) or drive it by hand (:meth:`step`, :meth:`run_until_idle`).

The request types live in :mod:`chatforge.generation_request`, the native cache in :mod:`chatforge.slot_cache`,
per-row sampling in :mod:`chatforge.row_sampling`; this file holds the scheduling loop.
"""

from __future__ import annotations

import itertools
import os
import threading
import traceback
from collections import deque
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from chatforge.engine import cache_dtype, left_padded, prefill
from chatforge.generation_request import Request, RequestEvent, RequestHandle
from chatforge.model.gpt import GPT, kv_heads
from chatforge.model.inference import inference_weights
from chatforge.row_sampling import sample_rows
from chatforge.slot_cache import SlotCache


class Scheduler:
    """Continuous batching over one causal LM (see the module docstring).

    ``max_batch``: most requests decoded together (the rest wait). ``cache_len``: slots of the native
    cache per row (default block_size + block_size // 4; more slots = fewer compactions, more memory).
    ``max_prefill_tokens``: most prompt tokens (padded) prefilled in one step, so a burst of long prompts
    does not stall the running batch for long (at least one request is always admitted).
    """

    def __init__(self, model: nn.Module, *, max_batch: int = 32, block_size: Optional[int] = None,
                 cache_len: Optional[int] = None, max_prefill_tokens: int = 4096, pad_id: int = 0,
                 seed: Optional[int] = None, batched: Optional[bool] = None):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.block_size = block_size or getattr(getattr(model, "cfg", None), "block_size", None)
        if not self.block_size:
            raise ValueError("the model has no cfg.block_size; pass block_size=")
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.pad_id = pad_id
        self.batched = isinstance(model, GPT) if batched is None else batched
        if self.batched and not isinstance(model, GPT):
            raise ValueError(f"batched decoding needs the native GPT, not {type(model).__name__}")
        self.cache_len = cache_len or self.block_size + max(self.block_size // 4, 8)
        if self.cache_len < self.block_size:
            raise ValueError(f"cache_len={self.cache_len} must be >= block_size={self.block_size}")
        self.cache: Optional[SlotCache] = None
        if self.batched:
            cfg = model.cfg
            self.cache = SlotCache(cfg.n_layer, max_batch, kv_heads(cfg), self.cache_len, cfg.n_embd // cfg.n_head,
                                   self.device, cache_dtype(model, self.device))
            self.cache.fused = inference_weights(model)  # the served weights do not change while it runs
        seed = seed if seed is not None else int.from_bytes(os.urandom(7), "little")  # the global RNG untouched
        self._seeds = torch.Generator().manual_seed(seed)  # seeds of requests that bring none
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self.waiting: deque[RequestHandle] = deque()
        self.active: list[RequestHandle] = []  # native: active[i] sits in cache row i
        self._jobs: deque[tuple[Callable[[], Any], dict]] = deque()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.steps = 0
        self.compactions = 0
        self.finished = 0
        """Requests that ended by a stop id or their token limit."""
        self.cancelled = 0
        """Requests cancelled (e.g. a client that went away) before they ended."""

    # -- submitting --------------------------------------------------------------------------------

    def submit(self, request: Request, on_event: Optional[Callable[[RequestEvent], None]] = None) -> RequestHandle:
        """Queue ``request``; ``on_event`` is called (on the scheduler thread) with each :class:`RequestEvent`.
        Raises ValueError for an empty prompt, a prompt that leaves no room in the context, or bad sampling values."""
        P = len(request.prompt)
        if P == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if P >= self.block_size:
            raise ValueError(f"the prompt is {P} tokens; the context holds {self.block_size} tokens, so a prompt "
                             f"may have at most {self.block_size - 1}")
        if request.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {request.temperature}")
        if not 0.0 < request.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {request.top_p}")
        if request.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {request.max_new_tokens}")
        h = RequestHandle(next(self._ids), request, on_event)
        h.max_new = min(request.max_new_tokens, self.block_size - P)
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            seed = request.seed if request.seed is not None else int(torch.randint(2**62, (1,), generator=self._seeds))
            h.generator = torch.Generator().manual_seed(seed)
            if h.max_new == 0:
                h._emit(RequestEvent(finish="length"))
                return h
            self.waiting.append(h)
            self._lock.notify()
        return h

    def call(self, fn: Callable[[], Any], timeout: Optional[float] = None) -> Any:
        """Run ``fn()`` with the model to itself (between steps, on the scheduler thread when it runs) and
        return its result (its exception is raised here)."""
        if self._thread is None:
            with torch.inference_mode():
                return fn()
        box: dict = {"done": threading.Event()}
        with self._lock:
            self._jobs.append((fn, box))
            self._lock.notify()
        if not box["done"].wait(timeout):
            raise TimeoutError(f"model call not run after {timeout} s")
        if "error" in box:
            raise box["error"]
        return box["result"]

    @property
    def num_active(self) -> int:
        return len(self.active)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def kv_bytes_per_request(self) -> Optional[int]:
        """KV-cache bytes held per active request (native backend), None for the per-request backend."""
        return self.cache.nbytes_per_row() if self.cache is not None else None

    # -- stepping ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """Drop cancelled requests, admit waiting ones (prefill), decode one token for the others.
        Returns True while requests remain (active or waiting)."""
        for h in [h for h in self.active if h.cancelled]:
            self._leave(h, RequestEvent(finish="cancelled"))
        with self._lock:
            for h in [h for h in self.waiting if h.cancelled]:
                self.waiting.remove(h)
                self.cancelled += 1
                h._emit(RequestEvent(finish="cancelled"))
            admit = self._take_waiting()
        if self.active:  # every active request has a pending token: decode them all, then admit newcomers
            self._decode(list(self.active))
        if admit:
            try:
                self._prefill(admit)
            except Exception as e:  # the newcomers are not in the batch yet: end them here
                for h in admit:
                    if h not in self.active and not h.done:
                        h._emit(RequestEvent(error=f"generation failed: {type(e).__name__}: {e}"))
                raise
        self.steps += 1
        return bool(self.active or self.waiting)

    def _take_waiting(self) -> list[RequestHandle]:
        out: list[RequestHandle] = []
        free = self.max_batch - len(self.active)
        longest = 0
        while self.waiting and len(out) < free:
            P = len(self.waiting[0].request.prompt)
            if out and max(longest, P) * (len(out) + 1) > self.max_prefill_tokens:
                break
            longest = max(longest, P)
            out.append(self.waiting.popleft())
        return out

    def run_until_idle(self, max_steps: int = 1_000_000) -> None:
        """Step until no request is left (for callers that drive the scheduler themselves)."""
        for _ in range(max_steps):
            if not self.step():
                return
        raise RuntimeError(f"still busy after {max_steps} steps")

    def _prefill(self, hs: list[RequestHandle]) -> None:
        model = self.model
        if not self.batched:
            for h in hs:
                p = torch.tensor([list(h.request.prompt)], dtype=torch.long, device=self.device)  # (1, P)
                h.cache = model.make_cache(1, p.shape[1] + h.max_new, self.device, cache_dtype(model, self.device))
                logits = model(p, cache=h.cache, last_only=True)[:, -1, :]  # (1, V)
                self.active.append(h)
                self._sample([h], logits)
            return
        prompts = [list(h.request.prompt) for h in hs]
        idx, mask = left_padded(prompts, self.pad_id, self.device)  # (B, P) each
        src = model.make_cache(*idx.shape, self.device, self.cache.k.dtype, fused=self.cache.fused)  # no new weight copy
        logits = prefill(model, src, idx, mask, [len(p) for p in prompts])  # (B, V), in length groups
        rows = self.cache.add_rows(src)
        for h, r in zip(hs, rows):
            h.row = r
            self.active.append(h)
        self._sample(hs, logits)

    def _compact(self) -> None:
        self.cache.compact()
        self.compactions += 1

    def _decode(self, hs: list[RequestHandle]) -> None:
        model = self.model
        if not self.batched:
            for h in hs:
                feed = torch.tensor([[h.pending]], dtype=torch.long, device=self.device)  # (1, 1)
                self._sample([h], model(feed, cache=h.cache, last_only=True)[:, -1, :])
            return
        if self.cache.length + 1 > self.cache_len:
            self._compact()
        feed = torch.empty(self.cache.n, dtype=torch.long)  # (n,): row i feeds its pending token
        for h in hs:
            feed[h.row] = h.pending
        logits = model(feed[:, None].to(self.device), cache=self.cache, last_only=True)[:, -1, :]  # (n, V)
        rows = torch.tensor([h.row for h in hs], device=logits.device)
        self._sample(hs, logits[rows])

    def _sample(self, hs: list[RequestHandle], logits: torch.Tensor) -> None:
        """Sample one token for each of ``hs`` from its (B, V) logits, emit it, retire finished requests."""
        temp = torch.tensor([h.request.temperature for h in hs], dtype=torch.float32)
        top_p = torch.tensor([h.request.top_p for h in hs], dtype=torch.float32)
        nxt, logp = sample_rows(logits, temp.to(logits.device), top_p.to(logits.device), [h.generator for h in hs])
        nxt_l = nxt.tolist()
        chosen = logp.gather(1, nxt[:, None]).squeeze(1).tolist()  # (B,)
        k = max(h.request.top_logprobs for h in hs)
        top_v = top_i = None
        if k > 0:
            top_v, top_i = torch.topk(logp, min(k, logp.shape[-1]), dim=-1)  # (B, k)
            top_v, top_i = top_v.tolist(), top_i.tolist()
        for i, h in enumerate(hs):
            t = nxt_l[i]
            top = None
            if h.request.top_logprobs > 0:
                top = list(zip(top_i[i][: h.request.top_logprobs], top_v[i][: h.request.top_logprobs]))
            finish = None
            if t in h.request.stop_ids:
                finish = "stop"
            elif len(h.tokens) + 1 >= h.max_new:
                finish = "length"
            if finish is None and h.cancelled:
                finish = "cancelled"
            h.pending = t
            if finish is not None:
                self._leave(h, RequestEvent(token=t, logprob=chosen[i], top=top, finish=finish))
            else:
                h._emit(RequestEvent(token=t, logprob=chosen[i], top=top))

    def _leave(self, h: RequestHandle, ev: RequestEvent) -> None:
        """Remove ``h`` from the batch (freeing its row) and emit its last event."""
        if h in self.active:
            if self.batched:
                moved = self.cache.remove_row(h.row)
                if moved is not None:
                    mover = next(a for a in self.active if a.row == moved)
                    mover.row = h.row
            self.active.remove(h)
        h.row, h.cache, h.pending = None, None, None
        if ev.finish == "cancelled":
            self.cancelled += 1
        elif ev.finish is not None:
            self.finished += 1
        h._emit(ev)

    def _fail_all(self, message: str) -> None:
        for h in list(self.active):
            self._leave(h, RequestEvent(error=message))

    # -- the thread --------------------------------------------------------------------------------

    def start(self) -> "Scheduler":
        """Run the step loop on a daemon thread until :meth:`close`."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="chatforge-scheduler", daemon=True)
            self._thread.start()
        return self

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self.waiting or self.active or self._jobs):
                    self._lock.wait()
                if self._closed:
                    break
                jobs = list(self._jobs)
                self._jobs.clear()
            for fn, box in jobs:
                try:
                    with torch.inference_mode():
                        box["result"] = fn()
                except Exception as e:  # handed to the caller
                    box["error"] = e
                box["done"].set()
            if self.active or self.waiting:
                try:
                    self.step()
                except Exception as e:  # a failed forward ends the requests of this batch, not the server
                    traceback.print_exc()
                    self._fail_all(f"generation failed: {type(e).__name__}: {e}")
        with self._lock:
            waiting = list(self.waiting)
            self.waiting.clear()
        for h in waiting + list(self.active):
            h._emit(RequestEvent(finish="cancelled"))
        self.active.clear()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still running end with finish "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
