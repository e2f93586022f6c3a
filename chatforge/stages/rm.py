"""Stage 3: a reward model on preference pairs (Bradley-Terry), initialised from the SFT model.

The model is the SFT trunk plus a scalar head ``score`` ~ N(0, 1/sqrt(d+1)). A sequence's reward
is the head's output at its last real token, which is the response's ``<|end|>`` (sequences are
right-padded and end exactly there, as transformers' LlamaForSequenceClassification reads them).
The distinct sequences of a micro-batch share one forward pass; with ``rm.group_by_prompt`` the pairs of
one prompt are batched together, so an answer that is in several pairs is computed once. Loss per pair
``-log sigmoid(r_c - r_r - margin)``, summed and divided by the global pair count of the step (with
``rm.pair_weighting=prompt`` each pair weighs 1/C(k,2), k its prompt's distinct answers, as InstructGPT:
a weighted mean). Dropout is off (chosen and rejected are compared forward to forward).

After training, the mean and std of the rewards of a reference set (held-out then training
responses, chosen and rejected, up to ``rm.norm_samples``) are stored in chatforge.json as
``reward_norm``, so that ``(r - mean) / std`` has mean 0 and std 1 there (used by PPO/GRPO).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.config import Config, ConfigError, ResolvedRun
from chatforge.data.batching import BucketBatcher, eval_batches
from chatforge.data.chunks import call_overhead_tokens, length_groups
from chatforge.data.pairs import (PairData, PairSequences, PromptRows, collate_prompt_rows, collate_unique,
                                  load_pair_data, pair_lengths)
from chatforge.model.heads import ScalarModel, branch_scores, gather_last, score_sequences
from chatforge.model.load import load_causal_lm, scalar_from_causal
from chatforge.model.lora import apply_lora
from chatforge.rl.roles import disable_dropout
from chatforge.stages.common import finish, stage_entry, start
from chatforge.trainer import Trainer


def pair_rewards(model: torch.nn.Module, batch: PairSequences | PromptRows) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen (B,), r_rejected (B,)) of B pairs, each sequence read at its last real token and computed once
    (pairs of one prompt share answers), from the batch :func:`collate_for` made.

    :class:`PromptRows` (a native model): a row per prompt, its answers branching from it, the prompt computed
    once. :class:`PairSequences`: the U distinct sequences, right-padded: padding sits after every real token, so
    it cannot change them and the fast causal path (no mask) is exact; gather_last picks the <|end|> position.
    Either way rows of similar length go through the model together (:func:`length_groups`), each group cut to
    its longest, so short ones do not pay for the longest one's padding.
    """
    if isinstance(batch, PromptRows):
        r = branch_scores(model, batch)  # (U,)
        return r[batch.chosen], r[batch.rejected]
    lengths = batch.attention_mask.sum(1).tolist()  # (U,)
    parts, order = [], []
    for rows in length_groups(lengths, call_overhead_tokens(batch.ids.device, sharded=D.is_fsdp(model))):
        T = max(lengths[i] for i in rows)
        sel = torch.tensor(rows, device=batch.ids.device)
        values = model(batch.ids[sel, :T])  # (u, T) fp32
        parts.append(gather_last(values, batch.attention_mask[sel, :T]))  # (u,)
        order += rows
    r = torch.cat(parts)[torch.argsort(torch.tensor(order, device=batch.ids.device))]  # (U,) in batch order
    return r[batch.chosen], r[batch.rejected]


def collate_for(model: torch.nn.Module, pairs: list, pad_id: int, device) -> PairSequences | PromptRows:
    """The batch :func:`pair_rewards` reads: a row per prompt for a native scalar model (no DDP, compile or FSDP
    wrapper), the distinct sequences for any other."""
    native = D.bare(model, ScalarModel) is not None
    return (collate_prompt_rows if native else collate_unique)(pairs, pad_id).to(device)


def prompt_pair_weights(pairs: list) -> list[float]:
    """InstructGPT's weight of each pair: 1 / C(k, 2), k = the number of distinct answers among the pairs of its
    prompt (a prompt with k answers fully ranked has C(k, 2) pairs, which together weigh 1). ``rm.pair_weighting
    = 'prompt'``; a prompt with a single pair weighs 1."""
    answers: dict[tuple, set] = {}
    for p in pairs:
        answers.setdefault(tuple(p.prompt), set()).update((tuple(p.chosen), tuple(p.rejected)))
    return [1.0 / math.comb(max(len(answers[tuple(p.prompt)]), 2), 2) for p in pairs]


def reward_model_from(policy: torch.nn.Module, lora) -> torch.nn.Module:
    """The reward model on the SFT trunk: a scalar head ~ N(0, 1/sqrt(d+1)), LoRA when lora.r > 0, and dropout off
    (chosen and rejected are compared forward to forward, as TRL turns it off)."""
    return disable_dropout(apply_lora(scalar_from_causal(policy, score_std=None), lora))


def calibration_table(r_c: torch.Tensor, r_r: torch.Tensor, bins: int) -> tuple[list[dict], float]:
    """Reliability of P(a > b) = sigmoid(r_a - r_b) on held-out pairs.

    Each pair is counted in both orders: (chosen, rejected) with outcome 1 and probability p, and
    (rejected, chosen) with outcome 0 and probability 1 - p, so the table is symmetric about 0.5 and
    ``observed`` is the frequency with which the first response was the chosen one. Returns the
    rows ``{lo, hi, n, predicted, observed}`` of non-empty bins and the expected calibration error.
    """
    p = torch.sigmoid((r_c - r_r).double())  # (N,)
    probs = torch.cat([p, 1 - p])  # (2N,)
    outcome = torch.cat([torch.ones_like(p), torch.zeros_like(p)])  # (2N,)
    idx = (probs * bins).long().clamp(max=bins - 1)  # (2N,)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        if n == 0:
            continue
        pred, obs = probs[sel].mean().item(), outcome[sel].mean().item()
        rows.append({"lo": b / bins, "hi": (b + 1) / bins, "n": n, "predicted": round(pred, 4), "observed": round(obs, 4)})
        ece += n / len(probs) * abs(pred - obs)
    return rows, ece


def reference_sequences(data: PairData, n: int) -> list[list[int]]:
    """Up to ``n`` prompt+response sequences: held-out pairs first, then training pairs, both sides."""
    seqs: list[list[int]] = []
    for p in list(data.val) + list(data.train):
        if len(seqs) >= n:
            break
        seqs += [p.prompt + p.chosen, p.prompt + p.rejected]
    return seqs[:n]


def reward_norm(model: torch.nn.Module, data: PairData, n: int, pad_id: int) -> dict:
    """{"mean", "std", "n"} of the rewards of the reference set (std floored at 1e-6)."""
    r = score_sequences(model, reference_sequences(data, n), pad_id)
    std = r.std().item() if len(r) > 1 else 1.0
    return {"mean": r.mean().item(), "std": max(std, 1e-6), "n": len(r)}


def held_out_rewards(trainer: Trainer, net: torch.nn.Module, data: PairData, pad_id: int,
                     max_batches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of every held-out pair (up to ``max_batches``), gathered from all ranks."""
    info, rc, rr = trainer.info, [], []
    for idx in eval_batches(pair_lengths(data.val), trainer.cfg.train.batch_size, info.rank, info.world_size,
                            max_batches):
        batch = collate_for(net, [data.val[j] for j in idx], pad_id, info.device)
        with trainer.autocast():
            c, r = pair_rewards(net, batch)
        rc += c.float().cpu().tolist()
        rr += r.float().cpu().tolist()
    parts = D.all_gather_objects((rc, rr))
    return (torch.tensor([x for p in parts for x in p[0]], dtype=torch.float64),
            torch.tensor([x for p in parts for x in p[1]], dtype=torch.float64))


def final_record(final: torch.nn.Module, data: PairData, cfg: Config, pad_id: int, result: dict) -> dict:
    """reward_norm (PPO/GRPO read it), the calibration table and the held-out accuracy, for chatforge.json."""
    norm = reward_norm(final, data, cfg.rm.norm_samples, pad_id)
    last_eval = result.get("eval") or {}
    extra = {"reward_norm": norm, "calibration": last_eval.get("calibration", [])}
    if "val_accuracy" in last_eval:
        extra["accuracy"] = last_eval["val_accuracy"]  # held-out preference accuracy (chance = 0.5)
    print(f"rm: reward mean {norm['mean']:.4g} std {norm['std']:.4g} on {norm['n']} reference sequences")
    return extra


@stage_entry
def run(cfg: Config, out: str | Path) -> dict:
    t_start = time.time()
    if not cfg.model.init:
        raise ConfigError("rm: --model.init is required (the SFT model directory the reward model starts from)")
    out, info = start(cfg, out)
    policy, mcfg, tok = load_causal_lm(cfg.model.init, "cpu", trust_remote_code=cfg.model.trust_remote_code)
    data = load_pair_data(cfg.data, tok, mcfg.block_size, verbose=info.is_main)
    torch.manual_seed(cfg.train.seed)  # the same score head on every rank
    mcfg.dropout = 0.0  # the saved reward model records no dropout
    model = reward_model_from(policy, cfg.lora).to(info.device)
    del policy
    B, A, W = cfg.train.batch_size, cfg.train.grad_accum, info.world_size
    groups = [tuple(p.prompt) for p in data.train] if cfg.rm.group_by_prompt else None
    batcher = BucketBatcher(pair_lengths(data.train), B, A, seed=cfg.train.seed, rank=info.rank, world_size=W,
                            groups=groups)
    if info.is_main:
        print(f"rm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
              f"{len(data.train):,} train / {len(data.val):,} held-out pairs; "
              f"batch {B} pairs x {A} accumulation x {W} processes = {B * A * W} pairs per step")
    trainer = Trainer(cfg, out, {"model": model}, info, state={"data": batcher}, model_cfg=mcfg)
    net = trainer.models["model"]
    margin = cfg.rm.margin
    weights = None
    if cfg.rm.pair_weighting == "prompt":  # 1 / C(k, 2), scaled to mean 1 so a step's count stays in pairs
        w = torch.tensor(prompt_pair_weights(data.train), dtype=torch.float64)
        weights = (w * len(w) / w.sum()).to(info.device)

    def micro_step(idx: list[int]) -> tuple[torch.Tensor, int, dict]:
        batch = collate_for(net, [data.train[j] for j in idx], tok.pad_id, info.device)
        r_c, r_r = pair_rewards(net, batch)  # (B,), (B,)
        r = torch.cat([r_c, r_r]).detach().double()  # (2B,)
        bt = losses.bradley_terry(r_c, r_r, margin)  # (B,)
        stats = {"correct": (r_c > r_r).sum(), "margin": (r_c - r_r).sum(), "reward": r.sum(),
                 "reward2": (r * r).sum(), "tokens": batch.tokens}
        if weights is None:
            return bt.sum(), len(idx), stats
        w = weights[idx]  # (B,) the pairs' weights: a weighted mean over the step's pairs
        return (bt * w.to(bt.dtype)).sum(), w.sum(), {**stats, "pairs": len(idx)}

    def step_fn(step: int) -> dict:
        res = trainer.accumulate(batcher.next(), micro_step)  # normalised by the step's pairs (or their weights)
        n = res.pop("count")
        n = res.pop("pairs", n)  # accuracy, margin and reward moments are per pair either way
        mean = res.pop("reward") / (2 * n)
        var = max(res.pop("reward2") / (2 * n) - mean * mean, 0.0)
        return {"loss": res.pop("loss"), "accuracy": res.pop("correct") / n, "margin": res.pop("margin") / n,
                "reward_mean": mean, "reward_std": math.sqrt(var), "tokens": res.pop("tokens"), **res}

    def eval_fn(step: int) -> dict:
        r_c, r_r = held_out_rewards(trainer, net, data, tok.pad_id, cfg.train.eval_batches)
        if len(r_c) == 0:
            return {}
        table, ece = calibration_table(r_c, r_r, cfg.rm.calibration_bins)
        r = torch.cat([r_c, r_r])
        return {"val_loss": losses.bradley_terry(r_c, r_r, margin).mean().item(),
                "val_accuracy": losses.preference_accuracy(r_c, r_r).item(),
                "val_margin": (r_c - r_r).mean().item(),
                "val_reward_mean": r.mean().item(), "val_reward_std": r.std().item() if len(r) > 1 else 0.0,
                "val_ece": ece, "val_pairs": len(r_c), "calibration": table}

    result = trainer.fit(step_fn, eval_fn if data.val else None, desc="rm")
    return finish(trainer, "model", cfg, tok, result, t_start=t_start, resolved=ResolvedRun(mcfg), data=data.meta,
                  on_final=lambda final: final_record(final, data, cfg, tok.pad_id, result), shown=("train_loss", "eval_val_loss", "eval_val_accuracy", "eval_val_margin"))
