"""Critic-free RL: GRPO (group-normalised advantages) and RLOO (leave-one-out baselines).

One trainer step = one rollout batch + its update epochs:
  1. rollout    rl.prompts_per_step prompts per rank, each sampled rl.group_size times (the engine, one batch),
                old log-probs (actor; taken from the update's own forward when its first optimizer step reads
                every row, see old_logp_from_update) and, when rl.grpo_kl_coef > 0, reference log-probs (frozen SFT)
  2. advantages one score per response (normalised reward, clipped, + rl.missing_eos_penalty when it never
                ended), then per group: GRPO (r - mean) / (std + rl.grpo_eps) (0 for a group of equal rewards), or
                RLOO r - mean of the other G - 1; the same advantage on every token of the response
  3. updates    rl.ppo_epochs x rl.minibatches of the clipped objective averaged per token ('token': all
                tokens of the minibatch weigh the same) or per sequence ('sequence': mean of per-response
                means), + rl.grpo_kl_coef * k3 KL(actor || ref) averaged the same way
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.config import Config, ConfigError
from chatforge.data.chunks import call_overhead_tokens
from chatforge.rl.prompts import PromptLoader, load_prompt_set
from chatforge.rl.roles import check_rl_config, load_roles, print_role_memory, reward_module
from chatforge.next_token_logits import plain_gpt
from chatforge.rl.rollout import RolloutBatch, by_row, collect, log_samples, response_logprobs, rollout_metrics
from chatforge.rl.stats import global_sums
from chatforge.rl.update import update_epochs
from chatforge.stages.common import finish_rl, stage_entry, start
from chatforge.trainer import Trainer

PER_UNIT = ("policy_loss", "kl_loss")  # averaged as rl.loss_averaging says (per token or per sequence)
PER_TOKEN = ("clipfrac", "approx_kl", "entropy")


def resolve_algo(rl) -> str:
    """'grpo' or 'rloo': rl.algo, whose shared default 'ppo' means GRPO here (the config is left as given)."""
    algo = "grpo" if rl.algo == "ppo" else rl.algo
    if algo not in ("grpo", "rloo"):
        raise ConfigError(f"rl.algo={rl.algo!r}: the grpo stage runs 'grpo' or 'rloo'")
    if rl.group_size < 2:
        raise ConfigError(f"rl.group_size={rl.group_size}: {algo} needs at least 2 samples per prompt")
    return algo


def advantages(score: torch.Tensor, algo: str, G: int, eps: float = 1e-4) -> torch.Tensor:
    """One advantage per response (N*G,) from its group's scores: GRPO (r - mean) / (std + eps), RLOO r - the
    mean of the other G - 1."""
    if algo == "grpo":
        return losses.grpo_advantages(score, G, eps)  # (N*G,)
    return losses.rloo_advantages(score.view(-1, G)).reshape(-1)  # (N*G,)


def old_logp_from_update(rl, rows: int) -> bool:
    """Whether the update's first optimizer step reads every row (one minibatch): it runs under the rollout's
    weights, so its own log-probs, detached, are the old log-probs (ratio 1) and the rollout skips their forward
    pass (as TRL's GRPOTrainer does with num_iterations=1); with more epochs that step keeps them for the later
    ones (update_epochs' ``first_step``). No extra memory: the advantages need no old log-probs, so each chunk
    still runs its forward and backward alone."""
    return min(rl.minibatches, rows) == 1


def summarise(res: dict) -> dict:
    """A minibatch's global sums -> means (loss terms per unit, diagnostics per token), and the gradient norm;
    with the old log-probs taken in the update, also the rollout's k1 KL to the reference per response."""
    n, n_tok = max(res["count"], 1.0), max(res["tokens"], 1.0)
    out = {**{k: res[k] / n for k in PER_UNIT if k in res}, **{k: res[k] / n_tok for k in PER_TOKEN if k in res},
           **{k: v for k, v in res.items() if "grad_norm" in k}}
    if "rollout_kl" in res:
        out["kl"] = res["rollout_kl"] / max(res["rows"], 1.0)
    return out


@stage_entry
def run(cfg: Config, out: str | Path) -> dict:
    rl, t_start = cfg.rl, time.time()
    algo = resolve_algo(rl)
    check_rl_config(cfg)
    out, info = start(cfg, out)
    roles = load_roles(cfg, info.device, need_ref=rl.grpo_kl_coef > 0)
    prompts = load_prompt_set(cfg, roles.tok, roles.model_cfg.block_size, log=info.is_main)
    loader = PromptLoader(len(prompts.ids), rl.prompts_per_step, cfg.train.seed, info.rank, info.world_size)
    G, T, MB = rl.group_size, rl.temperature, cfg.train.batch_size
    if info.is_main:
        print_role_memory({"actor": roles.actor, "reference": roles.ref, "reward": reward_module(roles.reward)},
                          trainable=("actor",))
        print(f"{algo}: {rl.prompts_per_step} prompts x {G} samples x {info.world_size} processes per rollout, "
              f"{rl.max_new_tokens} new tokens, {rl.ppo_epochs} epochs x {rl.minibatches} minibatches, "
              f"loss averaged per {rl.loss_averaging}, KL coef {rl.grpo_kl_coef}")
    trainer = Trainer(cfg, out, {"actor": roles.actor}, info, state={"prompts": loader}, model_cfg=roles.model_cfg,
                      weight_decay=rl.weight_decay)
    actor_net = trainer.models["actor"]
    per_seq = rl.loss_averaging == "sequence"

    def micro_step(sub: RolloutBatch, epoch: int, keep: Optional[list] = None) -> tuple[torch.Tensor, float, dict]:
        """The clipped objective (+ k3 KL to the reference) summed over tokens, or over sequences of their
        token means (rl.loss_averaging='sequence'); ``keep``: a list that gets the old log-probs (b, r) when this
        forward provides them."""
        m = sub.response_mask  # (b, r)
        n_tok = m.sum()
        logp, ent = response_logprobs(actor_net, sub, T, with_entropy=epoch == 0)  # (b, r)
        adv = sub.extra["advantages"][:, None].expand_as(m)  # (b, r): one advantage per response
        old = sub.extra.get("old_logp")
        if old is None:  # the first optimizer step (old_logp_from_update): under the rollout's weights
            old = logp.detach()  # (b, r)
            if keep is not None:
                keep.append(old)
        pg, pst = losses.ppo_policy_loss(logp, old, adv, m, rl.clip_eps,
                                         reduction="sequence_sum" if per_seq else "token_sum")
        stats = {"policy_loss": pg.detach(), "clipfrac": pst["clipfrac"] * n_tok,
                 "approx_kl": pst["approx_kl"] * n_tok, "tokens": n_tok}
        loss = pg
        if "ref_logp" in sub.extra and "old_logp" not in sub.extra:  # the rollout's KL metric (k1, per response)
            stats["rollout_kl"] = losses.masked_sum(losses.kl_penalty(old, sub.extra["ref_logp"], "k1"), m)
            stats["rows"] = len(sub)
        if "ref_logp" in sub.extra:
            k3 = losses.kl_penalty(logp, sub.extra["ref_logp"], "k3")  # (b, r)
            kl = losses.masked_mean(k3, m, dim=1).sum() if per_seq else losses.masked_sum(k3, m)
            loss = loss + rl.grpo_kl_coef * kl
            stats["kl_loss"] = kl.detach()
        if ent is not None:
            stats["entropy"] = losses.masked_sum(ent, m)
        return loss, (len(sub) if per_seq else n_tok), stats

    def step_fn(step: int) -> dict:
        lazy_old = old_logp_from_update(rl, rl.prompts_per_step * G)
        r = collect(trainer, roles, prompts, loader, rl, seed=cfg.train.seed, step=step, rank=info.rank,
                    micro_rows=MB, repeat=G, old_logp=not lazy_old)
        b, m = r.batch, r.batch.response_mask  # m (N*G, R)
        b.extra["advantages"] = advantages(r.score, algo, G, rl.grpo_eps)  # (N*G,)
        zero = (r.score.view(-1, G).std(dim=1) == 0).float().sum()
        kl_metric = {}
        if "ref_logp" in b.extra and not lazy_old:
            kl = losses.kl_penalty(b.extra["old_logp"], b.extra["ref_logp"], "k1") * m  # (B, R)
            n, zero_groups, kl_sum = global_sums(len(b) // G, zero, kl.sum())  # one all-reduce
            kl_metric["kl"] = kl_sum / (n * G)
        else:
            n, zero_groups = global_sums(len(b) // G, zero)
        def first_step(chunks: list[torch.Tensor]) -> dict:  # lazy_old, more epochs: keep the old log-probs
            subs, kept = [b.select(rows) for rows in chunks], []
            res = trainer.accumulate(subs, lambda sub: micro_step(sub, 0, kept))
            b.extra["old_logp"] = by_row(b, chunks, kept)  # (B, R)
            return res

        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
        with r.timer.phase("update"):
            stats = update_epochs(trainer, b, epochs=rl.ppo_epochs, minibatches=rl.minibatches, micro_rows=MB,
                                  generator=gen, micro_step=micro_step, summarise=summarise,
                                  overhead=call_overhead_tokens(info.device, sharded=D.is_fsdp(actor_net)),
                                  by_prompt=plain_gpt(actor_net) is not None,  # a group's prompt computed once
                                  first_step=first_step if lazy_old and rl.ppo_epochs > 1 else None)
        if "kl" in stats:  # the rollout's KL, summed in the update (lazy_old)
            kl_metric["kl"] = stats.pop("kl")
        log_samples(trainer, step, r, rl.sample_every)
        loss = stats["policy_loss"] + rl.grpo_kl_coef * stats.get("kl_loss", 0.0)
        return {"loss": loss, **rollout_metrics(r), **kl_metric, "zero_std_groups": zero_groups / n, **stats}

    result = trainer.fit(step_fn, None, desc=algo, show=("reward", "kl"))
    return finish_rl(trainer, cfg, roles, prompts, result, t_start, algo)
