"""Batched generation with a KV cache. The engine knows only token ids.

The batch is left-padded to the longest prompt, prefilled (the prompt tokens in one forward, filling
the cache), then decoded one token per step for every row until each row has produced a stop id or
``max_new_tokens`` tokens.

Works with any module whose ``forward(idx, attention_mask=None, cache=None, last_only=False)`` returns
logits (B, T, V) (the last position's only, (B, 1, V), with ``last_only``) and that offers
``make_cache(batch_size, max_len, device, dtype)`` (e.g. GPT). Where the cache can also prefill rows
apart and copy or drop rows (``sub``/``insert``/``keep``: the native model's :class:`KVCache`), the
engine does less work for the same tokens: a prompt given several times is prefilled once; prompts of
very different lengths are prefilled in length groups (no compute on the short ones' padding) and the
cache holds them longest first, so that decode steps attend by runs of rows that skip the short ones'
left padding; rows that have stopped leave the batch. The random draws are one uniform per batch row and
step, whatever the batch holds and in whichever order, so these change no sample.

Sampling: logits / temperature, then optional top-k and top-p (nucleus) filtering, then a draw
from the softmax with the given ``torch.Generator`` (reproducible). temperature == 0 is greedy.
Returned log-probs are those of the *unfiltered* tempered distribution,
``log_softmax(logits / temperature)`` in fp32 (``log_softmax(logits)`` when greedy), i.e. what a
later training forward at the same temperature computes for the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn as nn

from chatforge.data.chunks import call_overhead_tokens, length_groups


@dataclass
class GenerationResult:
    tokens: list[list[int]]
    """New tokens of each prompt, cut after the first stop id (which is included)."""
    finished: list[bool]
    """True where the row produced a stop id (False: it ran out of max_new_tokens)."""
    logprobs: Optional[list[list[float]]] = field(default=None)
    """Per new token, log-prob under log_softmax(logits / temperature) in fp32 (when asked)."""


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """(B, V) logits -> the same with everything outside the top-k / top-p nucleus set to -inf."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the top-1 always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p  # (B, V)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                top_p: Optional[float] = None, generator: Optional[torch.Generator] = None,
                u: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits -> (next ids (B,), their log-probs (B,) under log_softmax(logits / T), fp32).
    ``u``: the rows' uniforms for :func:`draw` when the caller drew them (else drawn from ``generator``)."""
    logits = logits.float()
    if temperature == 0:
        nxt = logits.argmax(dim=-1)  # (B,)
        logp = torch.log_softmax(logits, dim=-1)
    else:
        if temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1)  # (B, V)
        probs = torch.softmax(filter_logits(logits, top_k, top_p), dim=-1)  # (B, V)
        nxt = draw(probs, generator, u)  # (B,)
    return nxt, logp.gather(1, nxt[:, None]).squeeze(1)


def uniforms(n: int, generator: Optional[torch.Generator], device: torch.device) -> torch.Tensor:
    """(n, 1) fp64 uniforms in [0, 1) from ``generator`` (on its device), moved to ``device``: what :func:`draw`
    uses per row."""
    dev = generator.device if generator is not None else device
    return torch.rand(n, 1, generator=generator, device=dev, dtype=torch.float64).to(device)


def draw(probs: torch.Tensor, generator: Optional[torch.Generator] = None, u: Optional[torch.Tensor] = None
         ) -> torch.Tensor:
    """One index per row of (B, V) probabilities, by inverse-CDF sampling: u ~ U[0, total) per row, the first index
    whose cumulative probability exceeds u. Same law as ``torch.multinomial(probs, 1)`` (a zero-probability index is
    never drawn), but one uniform per row instead of one exponential per vocabulary entry: ~15x faster on CPU at
    batch 16 and V = 2048 (benchmarks/RESULTS.md). ``u`` (B, 1) fp64 in [0, 1): given uniforms (else drawn by
    :func:`uniforms` from ``generator``)."""
    if u is None:
        u = uniforms(probs.shape[0], generator, probs.device)
    cdf = probs.cumsum(-1, dtype=torch.float64)  # (B, V), fp64 so a large vocabulary sums without drift
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def prefill(model: nn.Module, cache, idx: torch.Tensor, mask: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Run the left-padded prompts idx (B, P) with their mask through ``model`` into ``cache``; return the last
    position's logits (B, V). Where the cache can take rows prefilled apart (``sub``/``insert``, the native
    model's), rows of similar length are prefilled together (:func:`length_groups`) so short prompts do not pay
    for the longest one's padding."""
    groups = length_groups(lengths, call_overhead_tokens(idx.device)) if hasattr(cache, "insert") else []
    if len(groups) <= 1:
        return model(idx, attention_mask=mask, cache=cache, last_only=True)[:, -1, :]
    P, out = idx.shape[1], []
    for rows in groups:
        T = max(lengths[i] for i in rows)
        sub = cache.sub(len(rows), T)
        out.append(model(idx[rows, P - T:], attention_mask=mask[rows, P - T:], cache=sub, last_only=True)[:, -1, :])
        cache.insert(sub, rows, P)
    order = torch.tensor([i for g in groups for i in g], device=idx.device)
    return torch.cat(out).index_select(0, torch.argsort(order))  # (B, V) back in row order


def left_padded(prompts: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (ids (B, P), mask (B, P) 1 = real token), left-padded with ``pad`` to the longest, on ``device``."""
    B, P = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, P), pad, dtype=torch.long)  # (B, P)
    mask = torch.zeros((B, P), dtype=torch.long)  # (B, P)
    for i, p in enumerate(prompts):
        idx[i, P - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):] = 1
    return idx.to(device), mask.to(device)


def start(model: nn.Module, prompts: Sequence[Sequence[int]], max_len: int, pad: int, device
          ) -> tuple[object, torch.Tensor]:
    """A KV cache of ``max_len`` slots holding the prefilled prompts, and the last position's logits (B, V).

    A prompt given several times (e.g. GRPO's group of samples per prompt) is prefilled once and its cache row
    copied for each of its rows, where the cache can (``keep``, the native model's): same keys, values and
    logits as a prefill of every row, in a fraction of the work.
    """
    first: dict[tuple, int] = {}
    src = [first.setdefault(tuple(p), len(first)) for p in prompts]  # (B,) each row's distinct prompt
    dtype = cache_dtype(model, device)
    distinct = [list(p) for p in first] if len(first) < len(prompts) else prompts
    cache = model.make_cache(len(distinct), max_len, device, dtype)
    if len(distinct) < len(prompts) and not hasattr(cache, "keep"):  # rows cannot be copied: prefill every one
        distinct, cache = prompts, model.make_cache(len(prompts), max_len, device, dtype)
    idx, mask = left_padded(distinct, pad, device)
    logits = prefill(model, cache, idx, mask, [len(p) for p in distinct])  # (U, V)
    if len(distinct) < len(prompts):
        rows = torch.tensor(src, device=device)  # (B,)
        cache.keep(rows)  # each distinct prompt's row copied for every row that asked for it
        logits = logits.index_select(0, rows)  # (B, V)
    return cache, logits


def cache_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype keys/values will have: the autocast dtype if autocast is on, else the weights' dtype."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(model.parameters()).dtype


class Engine:
    """Batched generation for a causal LM (see the module docstring)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def _steps(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
               top_k: Optional[int], top_p: Optional[float], stop_ids: Sequence[int], pad_id: Optional[int],
               generator: Optional[torch.Generator]
               ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield, per step, for the n rows the cache holds: (the batch row of each, as a list; next ids (n,);
        log-probs (n,); active (n,) bool = the row had not stopped before this token)."""
        if len(prompts) == 0:
            return
        if any(len(p) == 0 for p in prompts):
            raise ValueError(f"prompt {next(i for i, p in enumerate(prompts) if len(p) == 0)} is empty; "
                             "give at least one token (e.g. the BOS id)")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        model = self.model
        device = next(model.parameters()).device
        B, P = len(prompts), max(len(p) for p in prompts)
        block_size = getattr(getattr(model, "cfg", None), "block_size", None)
        if block_size is not None:
            if P > block_size:
                raise ValueError(f"prompt of {P} tokens exceeds the context length block_size={block_size}")
            max_new_tokens = min(max_new_tokens, block_size - P)  # positions stay within the trained context
        if max_new_tokens <= 0:
            return
        pad = 0 if pad_id is None else pad_id

        stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)  # (S,)
        # cache rows hold the prompts longest first, so that decode steps attend by runs of rows of similar length
        # and skip the short ones' left padding (KVCache.segments)
        order = sorted(range(B), key=lambda i: -len(prompts[i]))
        cache, logits = start(model, [prompts[i] for i in order], P + max_new_tokens, pad, device)  # (B, V)
        if hasattr(cache, "split_attention"):
            cache.split_attention = True
        rows_l = order  # the batch row each cache row holds
        rows = torch.tensor(order, device=device)  # (n,) the same
        identity = order == list(range(B))
        active = torch.ones(B, dtype=torch.bool, device=device)  # (n,) cache rows still generating
        for step in range(max_new_tokens):
            # one uniform per batch row and step, whichever rows are left: the draws do not depend on the order
            # of the cache rows nor on compaction
            u = uniforms(B, generator, device) if temperature > 0 else None  # (B, 1)
            if u is not None and not identity:
                u = u[rows]  # (n, 1)
            nxt, logp = sample_next(logits, temperature, top_k, top_p, u=u)  # (n,), (n,)
            yield rows_l, nxt, logp, active
            if step == max_new_tokens - 1:
                break
            if len(stop):
                active = active & ~torch.isin(nxt, stop)  # (n,) a new tensor: the one yielded stays as it was
                alive = int(active.sum())
                if alive == 0:
                    break
                if hasattr(cache, "keep") and len(rows_l) - alive >= max(1, len(rows_l) // 4):
                    kept = active.nonzero().squeeze(1)  # (alive,) cache rows still generating
                    cache.keep(kept)  # finished rows leave the batch: later steps compute only the others
                    rows, nxt, active = rows[kept], nxt[kept], active[kept]
                    rows_l = [rows_l[i] for i in kept.tolist()]
                    identity = False
                nxt = torch.where(active, nxt, pad)  # (n,) stopped rows still in the cache feed pad
            logits = model(nxt[:, None], cache=cache, last_only=True)[:, -1, :]  # (n, V)

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, stop_ids: Sequence[int] = (),
                 pad_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 return_logprobs: bool = False) -> GenerationResult:
        """Generate up to ``max_new_tokens`` for each prompt (lists of ids) in one batch.

        ``pad_id`` fills padding slots (masked out, so any valid id works; None = 0).
        ``max_new_tokens`` is capped so prompt + answer fit the model's ``cfg.block_size``.
        """
        B = len(prompts)
        tokens: list[list[int]] = [[] for _ in range(B)]
        logprobs: list[list[float]] = [[] for _ in range(B)]
        finished = [False] * B
        stop = set(stop_ids)
        for rows, nxt, logp, active in self._steps(prompts, max_new_tokens, temperature, top_k, top_p, stop_ids,
                                                   pad_id, generator):
            for i, t, lp, a in zip(rows, nxt.tolist(), logp.tolist(), active.tolist()):
                if a:
                    tokens[i].append(t)
                    logprobs[i].append(lp)
                    finished[i] = t in stop
        return GenerationResult(tokens=tokens, finished=finished, logprobs=logprobs if return_logprobs else None)

    @torch.inference_mode()
    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, *, temperature: float = 1.0,
               top_k: Optional[int] = None, top_p: Optional[float] = None, stop_ids: Sequence[int] = (),
               generator: Optional[torch.Generator] = None) -> Iterator[int]:
        """Yield the new token ids of one prompt as they are produced (the final stop id included)."""
        for _, nxt, _, _ in self._steps([prompt_ids], max_new_tokens, temperature, top_k, top_p, stop_ids,
                                        None, generator):
            yield int(nxt[0])
