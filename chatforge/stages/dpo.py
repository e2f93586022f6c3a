"""DPO: preference optimisation of the SFT policy against a frozen copy of itself, without a reward model.

Per pair, with sequence log-probs of the response tokens (the answer and its <|end|>):
    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))
    sigmoid (DPO):  -log sigmoid(beta * h)            log-probs summed over the response tokens
    ipo (IPO):      (h - 1 / (2 beta))^2               log-probs averaged per response token (as TRL does);
                                                       its implicit rewards beta * (pi - ref) from the same averages
Losses are summed and divided by the global pair count of the step. A native model reads each pair
as one row, prompt + chosen + rejected, both answers branching from the prompt (computed once:
~40% fewer tokens on HH-RLHF's multi-turn prompts); any other model reads chosen and rejected as 2B
rows of one forward. The reference is the starting model, frozen; with
``dpo.precompute_ref`` its log-probs of every train and held-out pair are computed once before
training (under the policy's autocast) and the reference model is freed. Dropout is off in both
(two forward passes are compared), so at step 0 every pair ties and the loss is exactly log 2.

Metrics: implicit rewards beta * (log pi - log ref) of chosen and rejected, their margin,
preference accuracy (chosen reward > rejected reward; at step 0 every pair ties, so 0), and the
drift of the chosen responses: (log pi - log ref) of their tokens per token (negative = the policy
moved probability away from the chosen answers, a known DPO failure mode).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.config import Config, ConfigError, ResolvedRun
from chatforge.data.batching import BucketBatcher, eval_batches
from chatforge.data.chunks import call_overhead_tokens, length_groups
from chatforge.data.pairs import (PackedPairs, PairBatch, TokenPair, collate_packed, collate_pairs, load_pair_data,
                                  pair_lengths)
from chatforge.model.load import load_causal_lm
from chatforge.model.lora import LoraReference, adapters_disabled, apply_lora, reference_from
from chatforge.model.gpt import GPT
from chatforge.next_token_logits import next_token_logits, plain_gpt
from chatforge.rl.roles import disable_dropout
from chatforge.stages.common import finish, stage_entry, start
from chatforge.trainer import Trainer


SUM_KEYS = ("loss", "reward_chosen", "reward_rejected", "correct", "chosen_drift", "chosen_tokens", "tokens")


def response_logps(model: torch.nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs (2B,), response token counts (2B,)) in fp32.

    Right padding + causal attention: the fast path without a mask is exact on real tokens. Rows of similar
    length go through the model together (:func:`length_groups`), each group cut to its longest, and the logits
    are those of the group's response span only (:func:`next_token_logits`): short pairs do not pay for the
    longest one's padding, nor the head for the prompts.
    """
    lengths = batch.attention_mask.sum(1).tolist()  # (2B,)
    starts = batch.response_mask.argmax(1).tolist()  # (2B,) each row's first response token
    dev = batch.ids.device
    sums, counts, order = [], [], []
    for rows in length_groups(lengths, call_overhead_tokens(dev, sharded=D.is_fsdp(model))):
        T, first = max(lengths[i] for i in rows), max(1, min(starts[i] for i in rows))
        sel = torch.tensor(rows, device=dev)
        ids = batch.ids[sel, :T]  # (b, T)
        logits = next_token_logits(model, ids, first)  # (b, T - first, V)
        lp = losses.token_logprobs(logits, ids[:, first:])  # (b, T - first): log p(token t | < t), t >= first
        m = batch.response_mask[sel, first:T].float()  # (b, T - first): targets that are response tokens
        sums.append((lp * m).sum(1))
        counts.append(m.sum(1))
        order += rows
    back = torch.argsort(torch.tensor(order, device=dev))  # (2B,) to batch row order
    return torch.cat(sums)[back], torch.cat(counts)[back]


def packed_logps(gpt: GPT, packed: PackedPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`response_logps` of a native GPT from one row per pair (prompt, chosen, rejected: the prompt computed
    once, both answers branching from it, see model.gpt.branch_layout), in length groups, the head on the answers'
    predicting slots only. -> (sums (2B,), counts (2B,)): chosen rows, then rejected rows, as ``response_logps``."""
    lengths = (packed.branches >= 0).sum(1).tolist()  # (B,)
    firsts = (packed.branches == 0).sum(1).tolist()  # (B,) each row's first answer slot = its prompt length
    dev = packed.ids.device
    sums, counts, order = [], [], []
    for rows in length_groups(lengths, call_overhead_tokens(dev)):
        T, first = max(lengths[i] for i in rows), min(firsts[i] for i in rows)
        sel = torch.tensor(rows, device=dev)
        ids, br = packed.ids[sel, :T], packed.branches[sel, :T]  # (b, T)
        h = gpt.model(ids, branches=br)  # (b, T, C)
        prev = packed.prev[sel, first:T]  # (b, T - first): the slot predicting each token
        h = h.gather(1, prev[..., None].expand(-1, -1, h.shape[-1]))  # (b, T - first, C)
        lp = losses.token_logprobs(gpt.lm_head(h), ids[:, first:])  # (b, T - first)
        side = br[:, first:]  # (b, T - first): 1 chosen, 2 rejected
        m = torch.stack([side == 1, side == 2]).float()  # (2 [chosen, rejected], b, T - first)
        sums.append((lp * m).sum(-1))  # (2, b)
        counts.append(m.sum(-1))  # (2, b)
        order += rows
    back = torch.argsort(torch.tensor(order, device=dev))  # (B,) to batch row order
    # (2, B) -> (2B,): chosen rows, then rejected rows
    return torch.cat(sums, 1)[:, back].reshape(-1), torch.cat(counts, 1)[:, back].reshape(-1)


def pair_logps(model: torch.nn.Module, pairs: list[TokenPair], pad_id: int, device, packed: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of response-token log-probs (2B,), response token counts (2B,)) in fp32 of B pairs, chosen rows then
    rejected rows. ``packed`` (the policy is a native GPT, :func:`plain_gpt`): each pair as one row with the prompt
    once (:func:`packed_logps`), for the reference too (a frozen copy, or the policy with its LoRA adapters off),
    so that policy and reference compute alike and tie exactly at step 0; else (transformers, DDP- or
    FSDP-wrapped) the two sequences (:func:`response_logps`)."""
    if not packed:
        return response_logps(model, collate_pairs(pairs, pad_id).to(device))
    batch = collate_packed(pairs, pad_id).to(device)
    if isinstance(model, LoraReference):
        with torch.no_grad(), adapters_disabled(model.policy):
            return packed_logps(model.policy, batch)
    return packed_logps(model, batch)


class RefLogps:
    """Reference log-prob sums of chosen/rejected per example, computed once (``dpo.precompute_ref``)."""

    def __init__(self, chosen: torch.Tensor, rejected: torch.Tensor):
        self.chosen, self.rejected = chosen, rejected  # (N,) fp32 each

    @classmethod
    @torch.inference_mode()
    def compute(cls, ref: torch.nn.Module, pairs: list[TokenPair], pad_id: int, batch_size: int,
                rank: int, world: int, device, packed: bool) -> "RefLogps":
        """Each rank scores its share of ``pairs``; the results are gathered on every rank."""
        mine: dict[int, tuple[float, float]] = {}
        for idx in eval_batches(pair_lengths(pairs), batch_size, rank, world):
            s, _ = pair_logps(ref, [pairs[j] for j in idx], pad_id, device, packed)  # (2b,)
            b = len(idx)
            for k, j in enumerate(idx):
                mine[j] = (s[k].item(), s[b + k].item())
        allv: dict[int, tuple[float, float]] = {}
        for part in D.all_gather_objects(mine):
            allv.update(part)
        c = torch.tensor([allv[i][0] for i in range(len(pairs))], dtype=torch.float32)
        r = torch.tensor([allv[i][1] for i in range(len(pairs))], dtype=torch.float32)
        return cls(c, r)

    def get(self, idx: list[int], device) -> torch.Tensor:
        """(2B,) reference sums in batch row order (chosen rows, then rejected rows)."""
        return torch.cat([self.chosen[idx], self.rejected[idx]]).to(device)


def precompute_reference(ref: torch.nn.Module, data, pad_id: int, batch_size: int, info, packed: bool,
                         autocast=contextlib.nullcontext) -> dict[str, RefLogps]:
    """The reference log-probs of every train and held-out pair, computed once (``dpo.precompute_ref``), under
    ``autocast()``: the policy's own precision (Trainer.autocast), so that at step 0 pi == ref exactly (a bf16
    policy against an fp32 reference would start away from log 2)."""
    t0 = time.time()
    with autocast():
        pre = {name: RefLogps.compute(ref, pairs, pad_id, batch_size, info.rank, info.world_size, info.device, packed)
               for name, pairs in (("train", data.train), ("val", data.val)) if pairs}
    if info.is_main:
        print(f"dpo: reference log-probs of {len(data.train) + len(data.val):,} pairs precomputed in "
              f"{time.time() - t0:.1f}s; reference model freed")
    return pre


def pair_terms(model: torch.nn.Module, pairs: list[TokenPair], pad_id: int, device, packed: bool, rf: torch.Tensor,
               beta: float, loss_type: str):
    """(per-pair losses (B,), chosen rewards (B,), rejected rewards (B,), policy sums (2B,), ref sums (2B,),
    response token counts (2B,)) of B pairs, given their reference sums ``rf`` (2B,)."""
    pi, n = pair_logps(model, pairs, pad_id, device, packed)  # (2B,), (2B,)
    k = len(pi) // 2
    if loss_type == "ipo":  # per-token averages, as TRL passes them to the IPO loss; the implicit rewards (and
        # so the logged margin and accuracy) come from the same averages: beta * (avg log pi - avg log ref)
        l, rc, rr = losses.dpo(pi[:k] / n[:k], pi[k:] / n[k:], rf[:k] / n[:k], rf[k:] / n[k:], beta, "ipo")
    else:
        l, rc, rr = losses.dpo(pi[:k], pi[k:], rf[:k], rf[k:], beta, "sigmoid")
    return l, rc, rr, pi.detach(), rf, n


def pair_sums(l, rc, rr, pi, rf, n) -> torch.Tensor:
    """A batch's sums (SUM_KEYS), float64: loss, chosen reward, rejected reward, correct, chosen drift, chosen
    tokens, tokens."""
    k = len(l)
    sums = [l.sum(), rc.sum(), rr.sum(), (rc > rr).sum(), (pi[:k] - rf[:k]).sum(), n[:k].sum(), n.sum()]
    return torch.stack([x.detach().double() for x in sums])  # (7,) on the batch's device: no sync here


def summary(acc: torch.Tensor, n_pairs: float, prefix: str = "") -> dict:
    """Means per pair (the drift per chosen token) of the SUM_KEYS sums ``acc``."""
    return {f"{prefix}loss": acc[0].item() / n_pairs, f"{prefix}reward_chosen": acc[1].item() / n_pairs,
            f"{prefix}reward_rejected": acc[2].item() / n_pairs,
            f"{prefix}margin": (acc[1].item() - acc[2].item()) / n_pairs,
            f"{prefix}accuracy": acc[3].item() / n_pairs,
            f"{prefix}chosen_drift": acc[4].item() / max(acc[5].item(), 1.0)}


@stage_entry
def run(cfg: Config, out: str | Path) -> dict:
    t_start = time.time()
    if not cfg.model.init:
        raise ConfigError("dpo: --model.init is required (the SFT model directory to optimise)")
    if cfg.dpo.beta <= 0:
        raise ConfigError(f"dpo.beta must be > 0, got {cfg.dpo.beta}")
    out, info = start(cfg, out)
    policy, mcfg, tok = load_causal_lm(cfg.model.init, info.device, trust_remote_code=cfg.model.trust_remote_code)
    mcfg.dropout = 0.0  # policy and reference are compared forward to forward: no dropout in either (as TRL)
    policy = disable_dropout(apply_lora(policy, cfg.lora))  # LoRA: no-op unless lora.r > 0 (its dropout off too)
    ref: Optional[torch.nn.Module] = reference_from(policy)  # LoRA: the policy with adapters off; else a frozen copy
    data = load_pair_data(cfg.data, tok, mcfg.block_size, verbose=info.is_main)
    B, A, W = cfg.train.batch_size, cfg.train.grad_accum, info.world_size
    beta, loss_type = cfg.dpo.beta, cfg.dpo.loss
    batcher = BucketBatcher(pair_lengths(data.train), B, A, seed=cfg.train.seed, rank=info.rank, world_size=W)
    if info.is_main:
        print(f"dpo: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters, "
              f"{len(data.train):,} train / {len(data.val):,} held-out pairs; loss {loss_type}, beta {beta}; "
              f"batch {B} pairs x {A} accumulation x {W} processes = {B * A * W} pairs per step")
    trainer = Trainer(cfg, out, {"model": policy}, info, state={"data": batcher}, model_cfg=mcfg)
    net = trainer.models["model"]
    packed = plain_gpt(net) is not None  # one path for policy and reference (see pair_logps)
    pre = precompute_reference(ref, data, tok.pad_id, B, info, packed, trainer.autocast) if cfg.dpo.precompute_ref else {}
    if cfg.dpo.precompute_ref:
        ref = None  # freed: every reference log-prob the run needs is in `pre`

    def ref_sums(split: str, idx: list[int], pairs: list[TokenPair]) -> torch.Tensor:
        if split in pre:
            return pre[split].get(idx, info.device)  # (2B,)
        with torch.inference_mode():
            return pair_logps(ref, pairs, tok.pad_id, info.device, packed)[0].clone()  # (2B,)

    def micro_step(idx: list[int]) -> tuple[torch.Tensor, int, dict]:
        pairs = [data.train[j] for j in idx]
        l, rc, rr, pi, rf, n = pair_terms(net, pairs, tok.pad_id, info.device, packed, ref_sums("train", idx, pairs),
                                          beta, loss_type)
        return l.sum(), len(idx), dict(zip(SUM_KEYS[1:], pair_sums(l, rc, rr, pi, rf, n)[1:]))

    def step_fn(step: int) -> dict:
        res = trainer.accumulate(batcher.next(), micro_step)  # normalised by the step's pairs
        n = res.pop("count")
        acc = torch.tensor([res.pop("loss") * n] + [res.pop(k) for k in SUM_KEYS[1:]], dtype=torch.float64)
        return {**summary(acc, n), "tokens": acc[6].item(), **res}

    def eval_fn(step: int) -> dict:
        acc = torch.zeros(8, dtype=torch.float64)  # the 7 sums + pair count
        for idx in eval_batches(pair_lengths(data.val), B, info.rank, W, cfg.train.eval_batches):
            pairs = [data.val[j] for j in idx]
            with trainer.autocast():
                terms = pair_terms(net, pairs, tok.pad_id, info.device, packed, ref_sums("val", idx, pairs), beta,
                                   loss_type)
            acc[:7] += pair_sums(*terms).cpu()
            acc[7] += len(idx)
        acc = D.all_reduce_sum(acc)
        if acc[7] == 0:
            return {}
        return {**summary(acc, acc[7].item(), "val_"), "val_pairs": int(acc[7].item())}

    result = trainer.fit(step_fn, eval_fn if data.val else None, desc="dpo")
    return finish(trainer, "model", cfg, tok, result, t_start=t_start, resolved=ResolvedRun(mcfg), data=data.meta,
                  shown=("train_loss", "eval_val_loss", "eval_val_accuracy", "eval_val_margin",
                         "eval_val_chosen_drift"))
