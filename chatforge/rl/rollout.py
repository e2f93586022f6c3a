"""Rollouts: sample responses with the engine, lay them out as training tensors, score them by forward passes.

Layout of a rollout batch of B rows (prompt length P = the longest prompt, R = the longest response):

    input_ids       (B, P + R)  left-padded prompt, then the response right-padded with pad_id
    attention_mask  (B, P + R)  1 on real prompt tokens and on response tokens up to the first <|end|>
    response_mask   (B, R)      1 on response tokens up to and including the first <|end|>, 0 after it

Positions come from the attention mask (the model numbers real tokens 0, 1, ...), so a left-padded
prompt gets the same positions in the training forward as in generation. The log-prob of response
token j is read from the logits at position P + j - 1, so ``logits[:, P-1:-1]`` (B, R, V) scores the
whole response; the critic's value of the state before token j is read at the same position.

Log-probs are recomputed by a forward pass (never taken from the engine) in fp32 at the sampling
temperature, so that old, new and reference log-probs come from one code path; the tests check that
they equal the engine's sampling log-probs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from chatforge import losses
from chatforge.config import ConfigError
from chatforge.engine import Engine


@dataclass
class RolloutBatch:
    """One batch of (prompt, response) rows as tensors (see the module docstring), plus per-row extras."""

    input_ids: torch.Tensor  # (B, P + R) long
    attention_mask: torch.Tensor  # (B, P + R) long
    response_mask: torch.Tensor  # (B, R) float, 1 = a scored response token
    prompt_len: int  # P
    finished: torch.Tensor  # (B,) bool: the response ended with <|end|>
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]  # cut after the first <|end|> (included when present)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per-row tensors: (B, R) per token (old_logp, ref_logp, values, advantages, returns) or (B,) per row."""

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)  # (B,)

    def to(self, device) -> "RolloutBatch":
        mv = lambda t: t.to(device)  # noqa: E731
        return RolloutBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.response_mask), self.prompt_len,
                            mv(self.finished), self.prompt_ids, self.response_ids,
                            {k: mv(v) for k, v in self.extra.items()})

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """The given rows, with columns that are padding in every one of them trimmed (less compute)."""
        rows = rows.to(self.input_ids.device)
        am = self.attention_mask[rows]  # (b, P + R)
        P = self.prompt_len
        cut = P - int(am[:, :P].sum(1).max().item())  # columns on the left that are padding in every row
        R = max(1, int(self.response_mask[rows].sum(1).max().item()))
        ex = {k: (v[rows][:, :R] if v.dim() == 2 else v[rows]) for k, v in self.extra.items()}
        sel = rows.tolist()
        return RolloutBatch(self.input_ids[rows][:, cut:P + R], am[:, cut:P + R], self.response_mask[rows][:, :R],
                            P - cut, self.finished[rows], [self.prompt_ids[i] for i in sel],
                            [self.response_ids[i] for i in sel], ex)


def cut_at_end(response: Sequence[int], end_id: int) -> tuple[list[int], bool]:
    """Keep a response up to and including its first ``end_id``; returns (tokens, ended)."""
    response = list(response)
    if end_id in response:
        return response[: response.index(end_id) + 1], True
    return response, False


def build_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
                end_id: int) -> RolloutBatch:
    """Lay prompts and responses out as a :class:`RolloutBatch` (tokens after the first ``end_id`` dropped)."""
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(f"build_batch: {len(prompt_ids)} prompts vs {len(response_ids)} responses")
    cut = [cut_at_end(r, end_id) for r in response_ids]
    responses = [c[0] for c in cut]
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        if not p or not r:
            raise ValueError(f"build_batch: row {i} has an empty {'prompt' if not p else 'response'}")
    B, P, R = len(prompt_ids), max(len(p) for p in prompt_ids), max(len(r) for r in responses)
    ids = torch.full((B, P + R), pad_id, dtype=torch.long)  # (B, P + R)
    am = torch.zeros((B, P + R), dtype=torch.long)  # (B, P + R)
    rm = torch.zeros((B, R), dtype=torch.float32)  # (B, R)
    for i, (p, r) in enumerate(zip(prompt_ids, responses)):
        ids[i, P - len(p):P] = torch.tensor(list(p), dtype=torch.long)
        ids[i, P:P + len(r)] = torch.tensor(r, dtype=torch.long)
        am[i, P - len(p):P + len(r)] = 1
        rm[i, :len(r)] = 1.0
    finished = torch.tensor([c[1] for c in cut], dtype=torch.bool)  # (B,)
    return RolloutBatch(ids, am, rm, P, finished, [list(p) for p in prompt_ids], responses)


@dataclass
class Sampled:
    response_ids: list[list[int]]
    finished: list[bool]
    logprobs: list[list[float]]  # the engine's sampling log-probs (for checks; training recomputes them)


def sample(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
           end_id: int, pad_id: int, generator: Optional[torch.Generator] = None, top_k: Optional[int] = None,
           top_p: Optional[float] = None) -> Sampled:
    """Batched generation with the KV cache (left-padded prompts), stopping at ``end_id``."""
    if temperature <= 0:
        raise ConfigError(f"rl.temperature must be > 0 for RL rollouts (log-prob ratios need a sampling "
                          f"distribution), got {temperature}")
    res = Engine(model).generate(prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 stop_ids=[end_id], pad_id=pad_id, generator=generator, return_logprobs=True)
    return Sampled(res.tokens, res.finished, res.logprobs)


def response_logits(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """The logits that score each response token: (B, R, V), from one forward over (B, P + R)."""
    P = batch.prompt_len
    logits = model(batch.input_ids, attention_mask=batch.attention_mask)  # (B, P + R, V)
    return logits[:, P - 1:-1]  # (B, R, V): position P + j - 1 predicts response token j


def response_logprobs(model: torch.nn.Module, batch: RolloutBatch, temperature: float,
                      with_entropy: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(log p(response token) at ``temperature`` in fp32 (B, R) * mask, entropy (B, R) detached or None)."""
    logits = response_logits(model, batch)  # (B, R, V)
    targets = batch.input_ids[:, batch.prompt_len:]  # (B, R)
    logp = losses.token_logprobs(logits, targets, temperature) * batch.response_mask  # (B, R)
    ent = None
    if with_entropy:
        with torch.no_grad():
            ent = losses.entropy_from_logits(logits.detach(), temperature) * batch.response_mask  # (B, R)
    return logp, ent


def response_values(critic: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """Critic values V(state before response token j), (B, R) fp32, 0 outside the response mask."""
    P = batch.prompt_len
    v = critic(batch.input_ids, attention_mask=batch.attention_mask)  # (B, P + R)
    return v[:, P - 1:-1].float() * batch.response_mask  # (B, R)
