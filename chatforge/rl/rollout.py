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

One RL step's rollout is :func:`collect` -> :class:`Rollout` (the batch with old/reference log-probs, the texts,
the rewards); :func:`rollout_metrics` and :func:`log_samples` report it. The algorithms' advantages and losses
are chatforge.losses'; the update loop is chatforge.rl.update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.config import ConfigError
from chatforge.config import RLConfig
from chatforge.engine import Engine
from chatforge.data.pairs import branch_rows
from chatforge.next_token_logits import next_token_logits, plain_gpt
from chatforge.data.chunks import FEWEST_CHUNKS, call_overhead_tokens, plan_chunks
from chatforge.rl.prompts import PromptLoader, PromptSet
from chatforge.rl.roles import Roles
from chatforge.rl.stats import check_finite, final_scores, global_sums
from chatforge.rl.timing import PhaseTimer
from chatforge.trainer import Trainer


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
        """The given rows, with columns that are padding in every one of them trimmed (less compute). The lengths
        come from the token lists, so selecting never waits for the device."""
        sel = rows.tolist()
        rows = rows.to(self.input_ids.device)
        am = self.attention_mask[rows]  # (b, P + R)
        P = self.prompt_len
        cut = P - max(len(self.prompt_ids[i]) for i in sel)  # columns on the left that are padding in every row
        R = max(1, max(len(self.response_ids[i]) for i in sel))
        ex = {k: (v[rows][:, :R] if v.dim() == 2 else v[rows]) for k, v in self.extra.items()}
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
    """The logits that score each response token: (B, R, V), from one forward over (B, P + R) (the LM head on the
    R scoring positions only where it can: :func:`next_token_logits`); a native GPT given rows that share a prompt
    (GRPO's groups) reads a row per prompt instead (:func:`branch_response_logits`)."""
    gpt = plain_gpt(model)
    if gpt is not None and len({tuple(p) for p in batch.prompt_ids}) < len(batch):
        return branch_response_logits(gpt, batch)
    return next_token_logits(model, batch.input_ids, batch.prompt_len, batch.attention_mask)  # (B, R, V)


def branch_response_logits(gpt: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """:func:`response_logits` of a native GPT from a row per distinct prompt, its responses branching from it
    (data.pairs.branch_rows, model.gpt.branch_layout): the prompt computed once for all the rows that share it.
    -> (B, R, V) in the batch's row order; positions past a response's end hold any logits (masked by the
    caller's response_mask)."""
    dev = batch.input_ids.device
    rows = branch_rows(list(zip(batch.prompt_ids, batch.response_ids)), 0).to(dev)
    h = gpt.model(rows.ids, branches=rows.branches)  # (G, T, C)
    R = batch.response_mask.shape[1]
    resp = torch.tensor([len(r) for r in batch.response_ids], device=dev)  # (B,)
    first = rows.last - resp + 1  # (B,) the slot of each response's first token in its row
    prompt_last = torch.tensor([len(p) - 1 for p in batch.prompt_ids], device=dev)  # (B,)
    j = torch.arange(R, device=dev)[None]  # (1, R)
    at = torch.where(j == 0, prompt_last[:, None], first[:, None] + j - 1)  # (B, R): the slot predicting token j
    at = torch.minimum(at, rows.last[:, None])  # past the response's end: any slot of the row
    return gpt.lm_head(h[rows.row[:, None], at])  # (B, R, V)


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


# ---------------------------------------------------------------------------------------------- one step's rollout


@dataclass
class Rollout:
    batch: RolloutBatch  # on the device; extra holds old_logp (and ref_logp when there is a reference)
    prompt_texts: list[str]
    response_texts: list[str]
    raw: torch.Tensor  # (B,) reward before normalisation
    norm: torch.Tensor  # (B,) normalised reward (RM) or the function's value
    score: torch.Tensor  # (B,) after clipping and the missing-EOS penalty
    timer: PhaseTimer  # seconds per phase of this step (gen, logp, ref, reward; the stage adds its own)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The sampling generator of one step: a pure function of (seed, step, rank), so resume is exact."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 4099 + rank * 7919) % (2**63 - 1))
    return g


def row_chunks(batch: RolloutBatch, rows: Sequence[int], max_rows: int, overhead: float,
               by_prompt: bool = False) -> list[torch.Tensor]:
    """``rows`` of ``batch`` grouped for forward passes of at most ``max_rows`` rows: length-sorted chunks that
    waste little compute on padding (chatforge/data/chunks.py); each a (b,) long tensor of row indices.

    ``by_prompt`` (the forward reads a row per prompt, :func:`branch_response_logits`): the rows of one prompt stay
    in one chunk, and the plan weighs a prompt's row at prompt + all its responses, where no prompt has more
    rows than ``max_rows``."""
    rows = list(rows)
    if by_prompt:
        units: dict[tuple[int, ...], list[int]] = {}
        for i in rows:
            units.setdefault(tuple(batch.prompt_ids[i]), []).append(i)
        groups = list(units.values())
        size = max(len(g) for g in groups)
        if len(groups) < len(rows) and size <= max_rows:
            width = [len(batch.prompt_ids[g[0]]) + sum(len(batch.response_ids[i]) for i in g) for g in groups]
            plan = plan_chunks(width, [0] * len(groups), max(1, max_rows // size), overhead)
            return [torch.tensor([i for u in c for i in groups[u]], dtype=torch.long) for c in plan]
    plan = plan_chunks([len(batch.prompt_ids[i]) for i in rows], [len(batch.response_ids[i]) for i in rows],
                       max_rows, overhead)
    return [torch.tensor([rows[j] for j in c], dtype=torch.long) for c in plan]


def chunked(batch: RolloutBatch, rows_per_chunk: int, fn: Callable[[RolloutBatch], torch.Tensor],
            overhead: float = FEWEST_CHUNKS) -> torch.Tensor:
    """fn over length-sorted chunks of at most ``rows_per_chunk`` rows (:func:`row_chunks`), padded back to (B, R)
    fp32."""
    chunks = row_chunks(batch, range(len(batch)), rows_per_chunk, overhead)
    return by_row(batch, chunks, [fn(batch.select(rows)) for rows in chunks])


def by_row(batch: RolloutBatch, chunks: Sequence[torch.Tensor], parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-chunk results (b, r) of the rows ``chunks`` (:func:`row_chunks`) -> one (B, R) fp32 tensor in the
    batch's row order, detached, 0 past each chunk's width."""
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.input_ids.device)  # (B, R)
    for rows, v in zip(chunks, parts):
        out[rows.to(out.device), :v.shape[1]] = v.detach().float()
    return out


def collect(trainer: Trainer, roles: Roles, prompts: PromptSet, loader: PromptLoader, rl: RLConfig, *, seed: int,
            step: int, rank: int, micro_rows: int, repeat: int = 1, old_logp: bool = True) -> Rollout:
    """The next prompts (each ``repeat`` times, consecutively), sampled responses, old/ref log-probs, scores.

    ``old_logp=False``: no old log-probs pass (the caller's update takes them from its own first forward, which
    runs under the same weights when the update is one optimizer step)."""
    tok, dev = roles.tok, roles.device
    rows = loader.next()
    prompt_ids = [prompts.ids[i] for i in rows for _ in range(repeat)]
    prompt_texts = [prompts.texts[i] for i in rows for _ in range(repeat)]
    actor = D.unwrap(trainer.models["actor"])
    timer = PhaseTimer(dev)
    with timer.phase("gen"), D.gathered(trainer.models["actor"]) as gen_actor, trainer.autocast():  # FSDP: gather once
        s = sample(gen_actor, prompt_ids, rl.max_new_tokens, rl.temperature, tok.end_id, tok.pad_id,
                   step_generator(seed, step, rank, dev))
    batch = build_batch(prompt_ids, s.response_ids, tok.pad_id, tok.end_id).to(dev)
    T, over = rl.temperature, call_overhead_tokens(dev, sharded=D.is_fsdp(actor))  # FSDP: equal calls on every rank
    with torch.no_grad(), trainer.autocast():
        if old_logp:
            with timer.phase("logp"):
                batch.extra["old_logp"] = chunked(batch, micro_rows, lambda b: response_logprobs(actor, b, T)[0],
                                                  over)
        if roles.ref is not None:
            with timer.phase("ref"):
                batch.extra["ref_logp"] = roles.frozen_forward(
                    lambda: chunked(batch, micro_rows, lambda b: response_logprobs(roles.ref, b, T)[0], over))
    with timer.phase("reward"):
        response_texts = [tok.decode(r[:-1] if f else r) for r, f in zip(batch.response_ids, batch.finished.tolist())]
        with roles.frozen():
            raw, norm = roles.reward.score(batch.prompt_ids, batch.response_ids, prompt_texts, response_texts)
        raw = torch.as_tensor(raw, dtype=torch.float32).to(dev)
        norm = torch.as_tensor(norm, dtype=torch.float32).to(dev)
    check_finite("the rewards", norm, step)
    return Rollout(batch, prompt_texts, response_texts, raw, norm, final_scores(norm, batch.finished, rl), timer)


def rollout_metrics(r: Rollout) -> dict[str, float]:
    """Global means over the step's responses (every rank's, one all-reduce), and the seconds per phase so far."""
    b = r.batch
    n, raw, norm, score, length, eos = global_sums(len(b), r.raw.sum(), r.norm.sum(), r.score.sum(),
                                                   b.response_lengths.sum(), b.finished.float().sum())
    return {"reward_raw": raw / n, "reward": norm / n, "score": score / n, "response_length": length / n,
            "eos_fraction": eos / n, "tokens": length, **r.timer.metrics()}


def log_samples(trainer: Trainer, step: int, r: Rollout, every: int, n: int = 4) -> None:
    """A few (prompt, response, reward) rows in metrics.jsonl every ``every`` steps and at the last step (rank 0)."""
    last = step + 1 == trainer.cfg.train.max_steps
    if not trainer.info.is_main or every <= 0 or (step % every != 0 and not last):
        return
    idx = range(0, len(r.batch), max(1, len(r.batch) // n))
    rows = [{"prompt": r.prompt_texts[i], "response": r.response_texts[i], "reward_raw": float(r.raw[i]),
             "score": float(r.score[i]), "ended": bool(r.batch.finished[i])} for i in list(idx)[:n]]
    trainer.log.write({"kind": "samples", "step": step + 1, "samples": rows})
