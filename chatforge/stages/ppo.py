"""Stage 4: RLHF with PPO against a reward model (or a Python reward), with a KL penalty to the SFT policy.

One trainer step = one rollout batch + its PPO epochs:
  1. rollout    rl.prompts_per_step prompts per rank -> responses (engine, KV cache, stop at <|end|>),
                old log-probs (actor), reference log-probs (frozen SFT), values (critic), scores (reward);
                the old log-probs and values come from the update's first forward instead when that step
                reads the whole rollout (first_step_reads_rollout: one minibatch of at most train.batch_size rows)
  2. rewards    score (normalised RM reward, clipped, + rl.missing_eos_penalty when no <|end|>) on the last
                response token, -beta * KL(actor || ref) per token (k1 or k3); beta fixed or adaptive
  3. advantages GAE (gamma, lambda) on the critic's values, whitened with global statistics
  4. updates    rl.ppo_epochs x rl.minibatches: clipped policy loss + rl.vf_coef * clipped value loss,
                one trainer.optimizer_step() (clip, step actor and critic) per minibatch
Roles and memory: chatforge/rl/roles.py; the rollout: rl/rollout.py; the update loop: rl/update.py; the
losses, GAE and whitening: chatforge/losses.py. This file is the algorithm and nothing else.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.config import Config, ConfigError
from chatforge.model.load import load_scalar_model, scalar_from_causal
from chatforge.model.lora import apply_lora
from chatforge.data.chunks import FEWEST_CHUNKS, call_overhead_tokens
from chatforge.rl.critic import NormalisedCritic, fold_scale
from chatforge.rl.kl_controller import make_kl_controller
from chatforge.rl.reward import RewardModelScorer
from chatforge.rl.prompts import PromptLoader, load_prompt_set
from chatforge.rl.roles import check_rl_config, disable_dropout, load_roles, print_role_memory, reward_module
from chatforge.rl.rollout import (RolloutBatch, by_row, chunked, collect, log_samples, response_logprobs,
                                  response_values, rollout_metrics)
from chatforge.rl.stats import check_finite, global_masked_moments, global_sums, masked_moment_sums, moments
from chatforge.rl.timing import PhaseTimer
from chatforge.rl.update import update_epochs
from chatforge.stages.common import finish_rl, stage_entry, start
from chatforge.trainer import Trainer

PER_TOKEN = ("policy_loss", "value_loss", "clipfrac", "approx_kl", "vf_clipfrac", "entropy")


def build_critic(cfg: Config, actor: torch.nn.Module, device: torch.device,
                 reward_norm: Optional[tuple[float, float]] = None) -> torch.nn.Module:
    """The value model: the RM (trunk and head) when there is one, else the policy trunk + a zero head.

    ``reward_norm`` (mean, std): the RM's normalisation, folded into the critic's head (chatforge/rl/critic.py)
    so that it starts on the scale of the returns, which are built from normalised rewards."""
    if cfg.rl.reward_model:
        critic, _, _ = load_scalar_model(cfg.rl.reward_model, device, trust_remote_code=cfg.model.trust_remote_code)
        if reward_norm is not None:
            fold_scale(critic, reward_norm[1])  # w / std, before LoRA wraps the head's model
        critic = disable_dropout(apply_lora(critic, cfg.lora)).to(device)
        if reward_norm is not None:
            critic = NormalisedCritic(critic, -reward_norm[0] / reward_norm[1])  # + (-mean / std)
        return critic
    critic = scalar_from_causal(actor, score_std=0.0)  # a LoRA actor gives its merged trunk
    return disable_dropout(apply_lora(critic, cfg.lora)).to(device)


def print_plan(rl, roles, critic: torch.nn.Module, world_size: int) -> None:
    print_role_memory({"actor": roles.actor, "critic": critic, "reference": roles.ref,
                       "reward": reward_module(roles.reward)}, trainable=("actor", "critic"))
    print(f"ppo: {rl.prompts_per_step} prompts x {world_size} processes per rollout, {rl.max_new_tokens} "
          f"new tokens, {rl.ppo_epochs} epochs x {rl.minibatches} minibatches; reward "
          f"{rl.reward_model or rl.reward_fn}; beta {rl.kl_coef}" + (f" -> KL target {rl.kl_target}" if rl.kl_target else ""))


def first_step_reads_rollout(rl, rows: int, micro_rows: int, world_size: int, overhead: float) -> bool:
    """Whether the update's first optimizer step reads every row of the rollout (one minibatch) in at most one
    micro-batch's worth of rows (``rows`` <= train.batch_size). That step runs under the rollout's weights, so its
    own forward gives the old log-probs and the values (detached) and the rollout skips those two passes
    (``first_step`` in :func:`run`); its chunks' graphs are kept until the advantages exist: at most
    train.batch_size rows, the memory of one micro-batch. With several processes only where every rank makes one
    forward call (``overhead`` = FEWEST_CHUNKS: FSDP, GPUs): a DDP forward arms the gradient sync of the backward
    that follows it, so several forwards before their backwards would sync too early."""
    one_call = overhead >= FEWEST_CHUNKS
    return min(rl.minibatches, rows) == 1 and rows <= micro_rows and (world_size == 1 or one_call)


def value_pass(trainer: Trainer, b: RolloutBatch, micro_rows: int, timer: PhaseTimer) -> None:
    """The critic's values of the rollout, (B, R) in ``b.extra["values"]`` (a no-grad pass)."""
    critic = D.unwrap(trainer.models["critic"])
    with torch.no_grad(), trainer.autocast(), timer.phase("value"):
        over = call_overhead_tokens(b.input_ids.device, sharded=D.is_fsdp(critic))
        b.extra["values"] = chunked(b, micro_rows, lambda s: response_values(critic, s), over)  # (B, R)


def advantages(b: RolloutBatch, score: torch.Tensor, beta: float, rl, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (the score at the last response token - beta * KL per token) -> GAE advantages (whitened over every
    rank) and returns, stored in ``b.extra`` next to its old log-probs, reference log-probs and values; returns
    (per-token KL (B, R), non-score reward per row (B,))."""
    m = b.response_mask  # (B, R)
    kl = losses.kl_penalty(b.extra["old_logp"], b.extra["ref_logp"], rl.kl_estimator) * m  # (B, R)
    rewards, non_score = losses.rlhf_rewards(score, kl, m, beta)  # (B, R), (B,)
    adv, returns = losses.gae(rewards, b.extra["values"], m, rl.gamma, rl.lam)  # (B, R) each
    if rl.whiten_advantages:
        mean, var = global_masked_moments(adv, m)
        adv = losses.whiten(adv, m, mean=mean, var=var)
    check_finite("the advantages", adv, step)
    b.extra.update(advantages=adv, returns=returns)
    return kl, non_score


def summarise(res: dict) -> dict:
    """A minibatch's global sums -> per-token means, and the gradient norms."""
    n = max(res["count"], 1.0)
    return {**{k: res[k] / n for k in PER_TOKEN if k in res}, **{k: v for k, v in res.items() if "grad_norm" in k}}


@stage_entry
def run(cfg: Config, out: str | Path) -> dict:
    rl, t_start = cfg.rl, time.time()
    if rl.algo != "ppo":
        raise ConfigError(f"rl.algo={rl.algo!r}: the ppo stage runs PPO; use `chatforge grpo --rl.algo={rl.algo}`")
    check_rl_config(cfg)
    out, info = start(cfg, out)
    roles = load_roles(cfg, info.device, need_ref=True)
    prompts = load_prompt_set(cfg, roles.tok, roles.model_cfg.block_size, log=info.is_main)
    loader = PromptLoader(len(prompts.ids), rl.prompts_per_step, cfg.train.seed, info.rank, info.world_size)
    T, MB = rl.temperature, cfg.train.batch_size
    norm = (roles.reward.mean, roles.reward.std) if isinstance(roles.reward, RewardModelScorer) else None
    critic = build_critic(cfg, roles.actor, info.device, norm)
    kl_ctl = make_kl_controller(rl.kl_coef, rl.kl_target, rl.kl_horizon)
    if info.is_main:
        print_plan(rl, roles, critic, info.world_size)
    trainer = Trainer(cfg, out, {"actor": roles.actor, "critic": critic}, info,
                      lrs={"critic": rl.critic_lr or cfg.optim.lr}, state={"prompts": loader, "kl": kl_ctl},
                      model_cfg=roles.model_cfg, weight_decay=rl.weight_decay)
    actor_net, critic_net = trainer.models["actor"], trainer.models["critic"]
    over = call_overhead_tokens(info.device, sharded=D.is_fsdp(actor_net))  # the cost of one more forward call

    def forward(sub: RolloutBatch, epoch: int) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
        """(log-probs (b, r), entropy (b, r) in the first epoch else None, values (b, r)) of the micro-batch."""
        logp, ent = response_logprobs(actor_net, sub, T, with_entropy=epoch == 0)  # (b, r)
        return logp, ent, response_values(critic_net, sub)

    def loss(sub: RolloutBatch, logp: torch.Tensor, ent: Optional[torch.Tensor],
             values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Clipped policy + value losses summed over the micro-batch's response tokens."""
        m = sub.response_mask  # (b, r)
        n = m.sum()
        pg, pst = losses.ppo_policy_loss(logp, sub.extra["old_logp"], sub.extra["advantages"], m, rl.clip_eps,
                                         reduction="token_sum")
        vf, vst = losses.ppo_value_loss(values, sub.extra["values"], sub.extra["returns"], m, rl.value_clip_eps,
                                        reduction="sum")
        stats = {"policy_loss": pg.detach(), "value_loss": vf.detach(), "clipfrac": pst["clipfrac"] * n,
                 "approx_kl": pst["approx_kl"] * n, "vf_clipfrac": vst["vf_clipfrac"] * n}
        if ent is not None:
            stats["entropy"] = losses.masked_sum(ent, m)
        return pg + rl.vf_coef * vf, n, stats

    def first_step(b: RolloutBatch, chunks: list[torch.Tensor], ready: Callable[[], None]) -> dict:
        """The update's first optimizer step when it reads the whole rollout (first_step_reads_rollout): each
        chunk's forward with its graph kept, the old log-probs and values read off it (the ratio is 1 in this
        step, as it is up to rounding when a rollout pass computes them), ``ready()`` (the advantages), then the
        losses, the backward passes and the optimizer step."""
        subs = [b.select(rows) for rows in chunks]
        outs = []
        for i, sub in enumerate(subs):
            with trainer.micro(last=i == len(subs) - 1):
                outs.append(forward(sub, 0))
        b.extra["old_logp"] = by_row(b, chunks, [o[0] for o in outs])  # (B, R)
        b.extra["values"] = by_row(b, chunks, [o[2] for o in outs])  # (B, R)
        ready()
        for rows, sub in zip(chunks, subs):
            sub.extra = b.select(rows).extra  # now with the advantages and returns
        return trainer.accumulate(list(zip(subs, outs)), lambda kept: loss(kept[0], *kept[1]))

    lazy = first_step_reads_rollout(rl, rl.prompts_per_step, MB, info.world_size, over)  # the same every step

    def step_fn(step: int) -> dict:
        r = collect(trainer, roles, prompts, loader, rl, seed=cfg.train.seed, step=step, rank=info.rank, micro_rows=MB,
                    old_logp=not lazy)
        b, m, beta = r.batch, r.batch.response_mask, kl_ctl.value
        made: dict[str, torch.Tensor] = {}

        def ready() -> None:  # the old log-probs and values are in b.extra
            made["kl"], made["non_score"] = advantages(b, r.score, beta, rl, step)

        if not lazy:
            value_pass(trainer, b, MB, r.timer)
            ready()
        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
        with r.timer.phase("update"):
            stats = update_epochs(trainer, b, epochs=rl.ppo_epochs, minibatches=rl.minibatches, micro_rows=MB,
                                  generator=gen, micro_step=lambda sub, epoch: loss(sub, *forward(sub, epoch)),
                                  summarise=summarise, overhead=over,
                                  first_step=(lambda chunks: first_step(b, chunks, ready)) if lazy else None)
        kl, non_score = made["kl"], made["non_score"]
        n, kl_sum, ns_sum, *sums = global_sums(len(b), kl.sum(), non_score.sum(),  # one all-reduce for all
                                               *masked_moment_sums(b.extra["returns"], m),
                                               *masked_moment_sums(b.extra["returns"] - b.extra["values"], m))
        var_ret, var_err = moments(*sums[:3])[1], moments(*sums[3:])[1]
        kl_ctl.update(kl_sum / n, int(n))
        log_samples(trainer, step, r, rl.sample_every)
        return {"loss": stats["policy_loss"] + rl.vf_coef * stats["value_loss"], **rollout_metrics(r),
                "kl": kl_sum / n, "non_score_reward": ns_sum / n, "beta": beta,
                "explained_variance": 1.0 - var_err / var_ret if var_ret > 0 else 0.0, **stats}

    result = trainer.fit(step_fn, None, desc="ppo", show=("reward", "kl", "beta"))
    return finish_rl(trainer, cfg, roles, prompts, result, t_start, "ppo")
