"""PPO's critic started from the reward model, on the scale of the returns it learns.

PPO's returns are built from the *normalised* reward ``(r - mean) / std`` (the rm stage's ``reward_norm``), so a
critic that starts as the raw reward model would begin off by that affine map. The map is folded into the head:

    v(h) = (w / std) . h + b,   b = -mean / std     =>   v(h) = (w . h - mean) / std     (exactly, up to rounding)

The scale goes into the score weight itself (``w / std``). The head is bias-free (Hugging Face's
LlamaForSequenceClassification has none, and the reward model directory stays loadable there), so the shift is
one extra trainable scalar ``b`` of the critic, which is never exported as a model (only the actor is saved; the
critic lives in checkpoints). Added after the head, it is exactly a bias of the head.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def fold_scale(scorer: nn.Module, std: float) -> nn.Module:
    """Divide the score head's weight (1, d) by ``std``, in place (before LoRA wraps the model); returns it."""
    if not std > 0:
        raise ValueError(f"fold_scale: reward std must be > 0, got {std}")
    with torch.no_grad():
        scorer.score.weight.div_(std)  # (1, d): w / std
    return scorer


class NormalisedCritic(nn.Module):
    """A scalar model (ids (B, T) -> (B, T)) plus a trainable scalar shift: with :func:`fold_scale` applied to it
    and ``shift = -mean / std``, its outputs are ``(raw - mean) / std`` at the start."""

    def __init__(self, scorer: nn.Module, shift: float):
        super().__init__()
        self.scorer = scorer
        device = next(scorer.parameters()).device
        self.shift = nn.Parameter(torch.full((1,), float(shift), dtype=torch.float32, device=device))

    @property
    def model(self) -> nn.Module:
        """The trunk (what distributed.wrap shards block by block)."""
        return getattr(self.scorer, "model", self.scorer)

    @property
    def cfg(self):
        return getattr(self.scorer, "cfg", None)

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx (B, T), attention_mask (B, T) -> values (B, T) fp32."""
        return self.scorer(idx, attention_mask).float() + self.shift.float()  # (B, T)
