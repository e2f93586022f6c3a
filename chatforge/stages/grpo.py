"""Critic-free RL: GRPO (group-normalised advantages) and RLOO (leave-one-out baselines).

One trainer step = one rollout batch + its update epochs:
  1. rollout    rl.prompts_per_step prompts per rank, each sampled rl.group_size times (the engine, one batch),
                old log-probs (actor) and, when rl.grpo_kl_coef > 0, reference log-probs (frozen SFT)
  2. advantages one score per response (normalised reward, clipped, or rl.missing_eos_penalty when it never
                ended), then per group: GRPO (r - mean) / (std + eps) (0 for a group of equal rewards), or
                RLOO r - mean of the other G - 1; the same advantage on every token of the response
  3. updates    rl.ppo_epochs x rl.minibatches of the clipped objective averaged per token ('token': all
                tokens of the minibatch weigh the same) or per sequence ('sequence': mean of per-response
                means), + rl.grpo_kl_coef * k3 KL(actor || ref) averaged the same way
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatforge import losses
from chatforge.config import Config, ConfigError
from chatforge.rl.common import RLRun, global_sums, print_role_memory, reward_module, update_epochs
from chatforge.rl.rollout import RolloutBatch, response_logprobs
from chatforge.trainer import Trainer


def run(cfg: Config, out: str | Path) -> dict:
    rl = cfg.rl
    if rl.algo == "ppo":  # the shared section's default: this stage runs GRPO unless told rloo
        rl.algo = "grpo"
    if rl.algo not in ("grpo", "rloo"):
        raise ConfigError(f"rl.algo={rl.algo!r}: the grpo stage runs 'grpo' or 'rloo'")
    if rl.group_size < 2:
        raise ConfigError(f"rl.group_size={rl.group_size}: {rl.algo} needs at least 2 samples per prompt")
    G, T = rl.group_size, rl.temperature
    R = RLRun(cfg, out, need_ref=rl.grpo_kl_coef > 0)
    info = R.info
    if info.is_main:
        print_role_memory({"actor": R.actor, "reference": R.ref, "reward": reward_module(R.reward)},
                          trainable=("actor",))
        print(f"{rl.algo}: {rl.prompts_per_step} prompts x {G} samples x {info.world_size} processes per rollout, "
              f"{rl.max_new_tokens} new tokens, {rl.ppo_epochs} epochs x {rl.minibatches} minibatches, "
              f"loss averaged per {rl.loss_averaging}, KL coef {rl.grpo_kl_coef}")
    trainer = Trainer(cfg, R.out, {"actor": R.actor}, info, state={"prompts": R.loader})
    actor_net = trainer.models["actor"]
    unit = "tokens" if rl.loss_averaging == "token" else "seqs"

    def loss_fn(sub: RolloutBatch, counts: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        m = sub.response_mask  # (b, r)
        logp, ent = response_logprobs(actor_net, sub, T, with_entropy=epoch == 0)  # (b, r)
        adv = sub.extra["advantages"][:, None].expand_as(m)  # (b, r): one advantage per response
        pg, pst = losses.ppo_policy_loss(logp, sub.extra["old_logp"], adv, m, rl.clip_eps, reduction=rl.loss_averaging)
        w_tok = m.sum() / counts["tokens"]  # share of the minibatch's global tokens
        w = w_tok if unit == "tokens" else len(sub) / counts["seqs"]  # share in the stated averaging
        loss = pg
        stats = {"policy_loss": pg.detach() * w, "clipfrac": pst["clipfrac"] * w_tok,
                 "approx_kl": pst["approx_kl"] * w_tok}
        if "ref_logp" in sub.extra:
            k3 = losses.kl_penalty(logp, sub.extra["ref_logp"], "k3")  # (b, r)
            kl = losses.masked_mean(k3, m) if unit == "tokens" else losses.masked_mean(k3, m, dim=1).mean()
            loss = loss + rl.grpo_kl_coef * kl
            stats["kl_loss"] = kl.detach() * w
        if ent is not None:
            stats["entropy"] = losses.masked_mean(ent, m) * w_tok
        return loss * w, stats

    def step_fn(step: int) -> dict:
        r = R.rollout(trainer, step, repeat=G)
        b, m = r.batch, r.batch.response_mask  # m (N*G, R)
        if rl.algo == "grpo":
            adv = losses.grpo_advantages(r.score, G)  # (N*G,)
        else:
            adv = losses.rloo_advantages(r.score.view(-1, G)).reshape(-1)  # (N*G,)
        b.extra["advantages"] = adv
        n, zero_groups = global_sums(len(b) // G, (r.score.view(-1, G).std(dim=1) == 0).float().sum())
        kl_metric = {}
        if "ref_logp" in b.extra:
            kl = losses.kl_penalty(b.extra["old_logp"], b.extra["ref_logp"], "k1") * m  # (B, R)
            kl_metric["kl"] = global_sums(kl.sum())[0] / (n * G)
        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
        stats = update_epochs(trainer, b, rl, cfg.train.batch_size, gen, loss_fn)
        R.write_samples(trainer, step, r)
        loss = stats["policy_loss"] + rl.grpo_kl_coef * stats.get("kl_loss", 0.0)
        return {"loss": loss, **R.rollout_metrics(r), **kl_metric, "zero_std_groups": zero_groups / n, **stats}

    result = trainer.fit(step_fn, None, desc=rl.algo, show=("reward", "kl"))
    return R.save(trainer, result, extra={"algo": rl.algo})
