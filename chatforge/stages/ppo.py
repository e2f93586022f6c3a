"""Stage 4: RLHF with PPO against a reward model (or a Python reward), with a KL penalty to the SFT policy.

One trainer step = one rollout batch + its PPO epochs:
  1. rollout    rl.prompts_per_step prompts per rank -> responses (engine, KV cache, stop at <|end|>),
                old log-probs (actor), reference log-probs (frozen SFT), values (critic), scores (reward)
  2. rewards    score (normalised RM reward, clipped, or rl.missing_eos_penalty when no <|end|>) on the last
                response token, -beta * KL(actor || ref) per token (k1 or k3); beta fixed or adaptive
  3. advantages GAE (gamma, lambda) on the critic's values, whitened with global statistics
  4. updates    rl.ppo_epochs x rl.minibatches: clipped policy loss + rl.vf_coef * clipped value loss,
                one trainer.optimizer_step() (clip, step actor and critic) per minibatch
Roles and memory: see chatforge/rl/common.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.config import Config, ConfigError
from chatforge.model.load import load_scalar_model, scalar_from_causal
from chatforge.model.lora import apply_lora
from chatforge.rl.common import (RLRun, check_finite, disable_dropout, global_masked_moments, global_sums,
                                 print_role_memory, reward_module, update_epochs)
from chatforge.rl.kl_controller import make_kl_controller
from chatforge.rl.rollout import RolloutBatch, response_logprobs, response_values
from chatforge.trainer import Trainer


def build_critic(cfg: Config, actor: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The value model: the RM (trunk and head) when there is one, else the policy trunk + a zero head."""
    if cfg.rl.reward_model:
        critic, _, _ = load_scalar_model(cfg.rl.reward_model, device, trust_remote_code=cfg.model.trust_remote_code)
    else:
        critic = scalar_from_causal(actor, score_std=0.0)  # a LoRA actor gives its merged trunk
    return disable_dropout(apply_lora(critic, cfg.lora)).to(device)


def run(cfg: Config, out: str | Path) -> dict:
    rl = cfg.rl
    if rl.algo != "ppo":
        raise ConfigError(f"rl.algo={rl.algo!r}: the ppo stage runs PPO; use `chatforge grpo --rl.algo={rl.algo}`")
    R = RLRun(cfg, out, need_ref=True)
    info, T = R.info, rl.temperature
    critic = build_critic(cfg, R.actor, info.device)
    kl_ctl = make_kl_controller(rl.kl_coef, rl.kl_target, rl.kl_horizon)
    if info.is_main:
        print_role_memory({"actor": R.actor, "critic": critic, "reference": R.ref, "reward": reward_module(R.reward)},
                          trainable=("actor", "critic"))
        W = info.world_size
        print(f"ppo: {rl.prompts_per_step} prompts x {W} processes per rollout, {rl.max_new_tokens} new tokens, "
              f"{rl.ppo_epochs} epochs x {rl.minibatches} minibatches; reward "
              f"{rl.reward_model or rl.reward_fn}; beta {rl.kl_coef}" + (f" -> KL target {rl.kl_target}" if rl.kl_target else ""))
    trainer = Trainer(cfg, R.out, {"actor": R.actor, "critic": critic}, info,
                      lrs={"critic": rl.critic_lr or cfg.optim.lr}, state={"prompts": R.loader, "kl": kl_ctl})
    actor_net, critic_net = trainer.models["actor"], trainer.models["critic"]

    def loss_fn(sub: RolloutBatch, counts: dict, epoch: int) -> tuple[torch.Tensor, dict]:
        m = sub.response_mask  # (b, r)
        logp, ent = response_logprobs(actor_net, sub, T, with_entropy=epoch == 0)  # (b, r)
        pg, pst = losses.ppo_policy_loss(logp, sub.extra["old_logp"], sub.extra["advantages"], m, rl.clip_eps)
        values = response_values(critic_net, sub)  # (b, r)
        vf, vst = losses.ppo_value_loss(values, sub.extra["values"], sub.extra["returns"], m, rl.value_clip_eps)
        w = m.sum() / counts["tokens"]  # this micro-batch's share of the minibatch's global tokens
        stats = {"policy_loss": pg.detach() * w, "value_loss": vf.detach() * w, "clipfrac": pst["clipfrac"] * w,
                 "approx_kl": pst["approx_kl"] * w, "vf_clipfrac": vst["vf_clipfrac"] * w}
        if ent is not None:
            stats["entropy"] = losses.masked_mean(ent, m) * w
        return (pg + rl.vf_coef * vf) * w, stats

    def step_fn(step: int) -> dict:
        r = R.rollout(trainer, step)
        b, m = r.batch, r.batch.response_mask  # m (B, R)
        with torch.no_grad(), trainer.autocast():
            b.extra["values"] = R.chunked(b, lambda s: response_values(D.unwrap(critic_net), s))  # (B, R)
        kl = losses.kl_penalty(b.extra["old_logp"], b.extra["ref_logp"], rl.kl_estimator) * m  # (B, R)
        beta = kl_ctl.value
        rewards, non_score = losses.rlhf_rewards(r.score, kl, m, beta)  # (B, R), (B,)
        adv, returns = losses.gae(rewards, b.extra["values"], m, rl.gamma, rl.lam)  # (B, R) each
        if rl.whiten_advantages:
            mean, var = global_masked_moments(adv, m)
            adv = losses.whiten(adv, m, mean=mean, var=var)
        check_finite("the advantages", adv, step)
        b.extra.update(advantages=adv, returns=returns)
        n, kl_sum, ns_sum = global_sums(len(b), kl.sum(), non_score.sum())
        _, var_ret = global_masked_moments(returns, m)
        _, var_err = global_masked_moments(returns - b.extra["values"], m)
        gen = torch.Generator().manual_seed(cfg.train.seed * 7919 + step)
        stats = update_epochs(trainer, b, rl, cfg.train.batch_size, gen, loss_fn)
        kl_ctl.update(kl_sum / n, int(n))
        R.write_samples(trainer, step, r)
        return {"loss": stats["policy_loss"] + rl.vf_coef * stats["value_loss"], **R.rollout_metrics(r),
                "kl": kl_sum / n, "non_score_reward": ns_sum / n, "beta": beta,
                "explained_variance": 1.0 - var_err / var_ret if var_ret > 0 else 0.0, **stats}

    result = trainer.fit(step_fn, None, desc="ppo", show=("reward", "kl", "beta"))
    return R.save(trainer, result)
