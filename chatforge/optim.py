"""The optimizer and learning-rate schedule of every stage: AdamW with weight decay on weight matrices only, and
linear warmup then cosine decay (or a constant rate)."""

from __future__ import annotations

import math

import torch
from torch import nn

from chatforge.config import OptimConfig


def lr_multiplier(step: int, oc: OptimConfig, max_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` (or flat for 'constant')."""
    if step < oc.warmup_steps:
        return (step + 1) / oc.warmup_steps
    if oc.schedule == "constant":
        return 1.0
    decay = oc.decay_steps or max_steps
    if step >= decay:
        return oc.min_lr_ratio
    progress = (step - oc.warmup_steps) / max(1, decay - oc.warmup_steps)
    return oc.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - oc.min_lr_ratio)


def make_optimizer(model: nn.Module, lr: float, oc: OptimConfig, device: torch.device,
                   weight_decay: float | None = None) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (not on norms, biases or embeddings); ``weight_decay``
    overrides ``oc.weight_decay`` (the RL stages pass rl.weight_decay)."""
    wd = oc.weight_decay if weight_decay is None else weight_decay
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = oc.fused and device.type in ("cuda", "cpu")
    try:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, fused=fused)
    except (RuntimeError, TypeError):  # fused kernel unavailable for these tensors
        opt = torch.optim.AdamW(groups, lr=lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)
    for g in opt.param_groups:
        g["base_lr"] = lr
    opt.register_step_post_hook(bump_versions)
    return opt


def bump_versions(opt: torch.optim.Optimizer, args, kwargs) -> None:
    """After a step, mark every parameter as modified in place: torch's fused AdamW writes them without bumping
    their version counters, and what is keyed on those counters (the prepacked weights generation keeps,
    chatforge/model/inference.py) must see the step."""
    for g in opt.param_groups:
        torch.autograd.graph.increment_version(g["params"])
