"""Losses and RL maths for every stage: pure functions of tensors.

No modules, no config objects, no globals. Shapes: B = batch (sequences), T = time (tokens), V = vocabulary,
N = prompts, G = completions per prompt (group size). A `mask` is 1 on the tokens that count and 0 elsewhere
(bool or float); in RL it is the response mask (prompt and padding are 0). Reductions over a mask are computed
in the dtype of `x`.

Stateful pieces (the adaptive KL controller) live with the stage that owns them, not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _check_shapes(fn: str, **tensors: Tensor) -> None:
    """Raise ValueError naming `fn` if the given tensors do not all share one shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"chatforge.losses.{fn}: shape mismatch {shapes}")


# ----------------------------------------------------------------------------------------------------------
# log-probabilities and entropy


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log p(targets) under softmax(logits / temperature), in fp32.

    logits (B, T, V), targets (B, T) int64 -> (B, T) float32.
    Computed as gather(z) - logsumexp(z) one row at a time, so the fp32 copy of the logits is (T, V), never
    a full (B, T, V) log_softmax. Targets must be valid ids (mask ignored positions afterwards).
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"chatforge.losses.token_logprobs: logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    out = []
    for row_logits, row_targets in zip(logits, targets):  # (T, V), (T,)
        z = row_logits.float() / temperature  # (T, V) fp32
        picked = z.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1)  # (T,)
        out.append(picked - torch.logsumexp(z, dim=-1))  # (T,)
    return torch.stack(out)  # (B, T)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0, chunk_size: int = 128) -> Tensor:
    """Entropy of softmax(logits / temperature) in nats, in fp32. logits (B, T, V) -> (B, T).

    H = logsumexp(z) - sum_v p_v z_v, computed ``chunk_size`` positions at a time over the flattened (B*T) rows,
    so the fp32 copies (z, p) are (chunk_size, V), never a full (B, T, V) softmax (as TRL's
    entropy_from_logits(chunk_size=...)).
    """
    flat = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    out = []
    for rows in flat.split(max(1, chunk_size)):  # (c, V)
        z = rows.float() / temperature  # (c, V) fp32
        lse = torch.logsumexp(z, dim=-1)  # (c,)
        p = torch.exp(z - lse.unsqueeze(-1))  # (c, V)
        out.append(lse - (p * z).sum(-1))  # (c,)
    if not out:
        return logits.new_zeros(logits.shape[:-1], dtype=torch.float32)
    return torch.cat(out).reshape(logits.shape[:-1])  # (B, T)


# ----------------------------------------------------------------------------------------------------------
# masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x where mask == 1. x, mask same shape; dim=None sums everything (scalar)."""
    _check_shapes("masked_sum", x=x, mask=mask)
    xm = x * mask.to(x.dtype)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x where mask == 1 (over `dim`, or everything when None). An empty mask gives 0, not NaN."""
    m = mask.to(x.dtype)
    count = m.sum() if dim is None else m.sum(dim)
    return masked_sum(x, m, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all entries where mask == 1 (scalar); `unbiased` applies Bessel's n/(n-1)."""
    m = mask.to(x.dtype)
    n = m.sum()
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"chatforge.losses.masked_var: need at least {2 if unbiased else 1} masked entries, got {int(n)}")
    var = masked_mean((x - masked_mean(x, m)) ** 2, m)
    return var * n / (n - 1) if unbiased else var


def whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    mean: Tensor | float | None = None,
    var: Tensor | float | None = None,
) -> Tensor:
    """(x - mean) / sqrt(var + eps) over the masked entries; masked-out entries become 0.

    x, mask (B, T) -> (B, T). mean/var default to this tensor's masked mean and unbiased variance; pass
    precomputed global ones (e.g. all-reduced over ranks) to whiten identically everywhere. With
    shift_mean=False the mean is added back (scale only), as for PPO rewards.
    """
    mean = masked_mean(x, mask) if mean is None else mean
    var = masked_var(x, mask) if var is None else var
    out = (x - mean) * torch.rsqrt(torch.as_tensor(var, dtype=x.dtype, device=x.device) + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# language modelling


def lm_loss(logits: Tensor, targets: Tensor, mask: Tensor | None = None, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy and the number of tokens it covers.

    logits (B, T, V), targets (B, T), mask (B, T) or None -> (loss_sum scalar fp32, n_tokens scalar int64).
    A token counts where mask == 1 and target != ignore_index. Return the sum, not the mean, so the caller
    divides by the token count of the whole optimizer step (all micro-batches, all ranks): that makes gradient
    accumulation and data parallelism exact when sequences have different numbers of loss tokens.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"chatforge.losses.lm_loss: logits {tuple(logits.shape)} vs targets {tuple(targets.shape)}")
    if mask is not None:
        _check_shapes("lm_loss", targets=targets, mask=mask)
        targets = targets.masked_fill(mask == 0, ignore_index)
    loss_sum = F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index, reduction="sum"
    )  # scalar
    return loss_sum, (targets != ignore_index).sum()


def lm_loss_mean(logits: Tensor, targets: Tensor, mask: Tensor | None = None, ignore_index: int = -100) -> Tensor:
    """Mean cross-entropy per counted token of this batch (0 when none count). Same shapes as lm_loss."""
    loss_sum, n = lm_loss(logits, targets, mask, ignore_index)
    return loss_sum / n.clamp(min=1)


# ----------------------------------------------------------------------------------------------------------
# preferences: reward model and DPO


def bradley_terry(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float = 0.0) -> Tensor:
    """Per-pair Bradley-Terry loss -log sigmoid(r_chosen - r_rejected - margin). (B,), (B,) -> (B,)."""
    _check_shapes("bradley_terry", r_chosen=r_chosen, r_rejected=r_rejected)
    return -F.logsigmoid(r_chosen - r_rejected - margin)


def preference_accuracy(r_chosen: Tensor, r_rejected: Tensor) -> Tensor:
    """Fraction of pairs with r_chosen > r_rejected (ties count as wrong). (B,), (B,) -> scalar."""
    _check_shapes("preference_accuracy", r_chosen=r_chosen, r_rejected=r_rejected)
    return (r_chosen > r_rejected).float().mean()


def dpo(
    pi_chosen_logp: Tensor,
    pi_rejected_logp: Tensor,
    ref_chosen_logp: Tensor,
    ref_rejected_logp: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO / IPO loss per pair, and the implicit rewards.

    Inputs (B,) are sequence log-probs of the response tokens (normally summed over them; the caller chooses).
    h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected), the log-ratio difference.
      sigmoid (DPO, Rafailov et al. 2023): -log sigmoid(beta * h); with label_smoothing e (cDPO):
               -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h).
      ipo (Azar et al. 2023, eq. 17, as in TRL): (h - 1 / (2 beta))^2, beta playing the paper's tau. It is
               applied to whatever log-probs are passed: TRL passes per-token averaged log-probs for IPO;
               summed log-probs give the paper's unnormalised form.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards = beta * (pi - ref), detached.
    """
    _check_shapes("dpo", pi_chosen_logp=pi_chosen_logp, pi_rejected_logp=pi_rejected_logp,
                  ref_chosen_logp=ref_chosen_logp, ref_rejected_logp=ref_rejected_logp)
    chosen_ratio = pi_chosen_logp - ref_chosen_logp  # (B,)
    rejected_ratio = pi_rejected_logp - ref_rejected_logp  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"chatforge.losses.dpo: loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ----------------------------------------------------------------------------------------------------------
# RLHF: KL, rewards, advantages


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman, "Approximating KL divergence").

    logp, ref_logp (B, T) -> (B, T). With r = ref_logp - logp:
      k1 = -r = logp - ref_logp (unbiased, can be negative); k2 = r^2 / 2; k3 = (exp(r) - 1) - r (unbiased, >= 0).
    """
    _check_shapes("kl_penalty", logp=logp, ref_logp=ref_logp)
    log_r = ref_logp - logp  # (B, T)
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r**2
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"chatforge.losses.kl_penalty: estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def rlhf_rewards(score: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: -kl_coef * kl on every response token, plus the RM score on the last one.

    score (B,), kl (B, T), mask (B, T) -> (rewards (B, T), non_score_reward (B,) = sum of the KL part).
    The last response token of a row is its last index with mask == 1 (trailing padding after EOS is fine).
    """
    _check_shapes("rlhf_rewards", kl=kl, mask=mask)
    m = mask.to(kl.dtype)
    if (m.sum(1) == 0).any():
        raise ValueError("chatforge.losses.rlhf_rewards: a row has no response token (mask all zero)")
    non_score = -kl_coef * kl * m  # (B, T)
    positions = torch.arange(kl.shape[1], device=kl.device)  # (T,)
    last = (positions * (m > 0)).argmax(dim=1)  # (B,) last index where mask == 1
    rewards = non_score.clone()
    rewards[torch.arange(kl.shape[0], device=kl.device), last] += score.to(kl.dtype)
    return rewards, non_score.sum(1)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over response tokens (pass detached values).

    rewards, values, mask (B, T) -> (advantages (B, T), returns (B, T) = advantages + values).
    Values (and rewards) outside the mask count as 0, so the value after the last response token is the
    terminal 0; masked-out positions get 0 advantage and 0 return. The mask is expected to be contiguous per
    row (prompt 0s, response 1s, padding 0s).
    """
    _check_shapes("gae", rewards=rewards, values=values, mask=mask)
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m  # (B, T)
    lastgaelam, advantages_reversed = 0.0, []
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else 0.0  # (B,)
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # (B,)
        lastgaelam = delta + gamma * lam * lastgaelam  # (B,)
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1], dim=1) * m  # (B, T)
    return advantages, advantages + values


def grpo_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4, scale: bool = True) -> Tensor:
    """Group-relative advantages (GRPO): (r - group mean) / (group std + eps).

    rewards (N*G,) grouped consecutively, or (N, G) -> (N*G,). std is torch.std, i.e. unbiased (n - 1), as in
    TRL; eps = 1e-4 (TRL's) keeps a near-tied group (std << eps, e.g. rewards equal but for rounding) near 0
    instead of blowing its differences up to order 1. scale=False gives r - group mean (Dr. GRPO). A group whose
    rewards are all equal gets exactly 0.
    """
    if group_size < 2 or rewards.numel() % group_size != 0:
        raise ValueError(f"chatforge.losses.grpo_advantages: {rewards.numel()} rewards do not split into groups of {group_size} (need >= 2)")
    r = rewards.reshape(-1, group_size)  # (N, G)
    adv = r - r.mean(dim=1, keepdim=True)  # (N, G)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    adv = adv.masked_fill((r == r[:, :1]).all(dim=1, keepdim=True), 0.0)  # all-equal group: no signal
    return adv.reshape(-1)


def rloo_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE leave-one-out: r_i minus the mean reward of the other G - 1 samples. (N, G) -> (N, G)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"chatforge.losses.rloo_advantages: need rewards (N, G) with G >= 2, got {tuple(rewards.shape)}")
    G = rewards.shape[1]
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (G - 1)  # (N, G)
    return rewards - baseline


# ----------------------------------------------------------------------------------------------------------
# PPO


def ppo_policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    reduction: str = "token",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate objective: mean of max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)).

    logp, old_logp, advantages, mask (B, T) -> (loss scalar, stats).
    reduction="token": mean over all masked tokens; "sequence": mean over sequences of each one's token mean
    (GRPO/RLOO); "token_sum" and "sequence_sum": the same sums before the division by the number of tokens or
    sequences (a micro-batch's share, which the trainer divides by the global count). Stats (detached, token means over the mask): clipfrac = fraction of tokens where the clipped
    term is the active one; approx_kl = k3 estimate of KL(old || new), mean of (ratio - 1) - log ratio;
    ratio = mean ratio.
    """
    _check_shapes("ppo_policy_loss", logp=logp, old_logp=old_logp, advantages=advantages, mask=mask)
    log_ratio = logp - old_logp  # (B, T)
    ratio = torch.exp(log_ratio)  # (B, T)
    pg_losses = -advantages * ratio  # (B, T)
    pg_losses_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)  # (B, T)
    pg_loss_max = torch.max(pg_losses, pg_losses_clipped)  # (B, T)
    if reduction == "token":
        loss = masked_mean(pg_loss_max, mask)
    elif reduction == "sequence":
        loss = masked_mean(pg_loss_max, mask, dim=1).mean()
    elif reduction == "token_sum":
        loss = masked_sum(pg_loss_max, mask)
    elif reduction == "sequence_sum":
        loss = masked_mean(pg_loss_max, mask, dim=1).sum()
    else:
        raise ValueError(f"chatforge.losses.ppo_policy_loss: reduction must be 'token', 'sequence', 'token_sum' or "
                         f"'sequence_sum', got {reduction!r}")
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_losses_clipped > pg_losses).float(), mask),
            "approx_kl": masked_mean(ratio - 1 - log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_eps: float = 0.2, reduction: str = "mean"
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss 0.5 * mean(max((v - R)^2, (clip(v, v_old - eps, v_old + eps) - R)^2)) over the mask
    (``reduction="sum"``: the sum over the mask instead of the mean).

    values, old_values, returns, mask (B, T) -> (loss scalar, stats with vf_clipfrac = fraction of tokens
    where the clipped term is the larger one).
    """
    _check_shapes("ppo_value_loss", values=values, old_values=old_values, returns=returns, mask=mask)
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)  # (B, T)
    vf_losses = (values - returns) ** 2  # (B, T)
    vf_losses_clipped = (values_clipped - returns) ** 2  # (B, T)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chatforge.losses.ppo_value_loss: reduction must be 'mean' or 'sum', got {reduction!r}")
    reduce = masked_mean if reduction == "mean" else masked_sum
    loss = 0.5 * reduce(torch.max(vf_losses, vf_losses_clipped), mask)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((vf_losses_clipped > vf_losses).float(), mask)}
    return loss, stats
