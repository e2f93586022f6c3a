"""The logits that score tokens ``first..T-1`` of a batch, from one causal-LM forward: the one place that knows a
plain native GPT can run its LM head on those positions only.

Scoring a response (RL's log-probs, DPO's sequence log-probs) reads the logits of the positions before its tokens;
the prompt positions' logits are never read. For a plain native :class:`GPT` (its forward is
``lm_head(model(...))``) the head then runs on the read positions only: at a 2,048-id vocabulary the head is ~25%
of a 1M-parameter model's forward, and the (B, T, V) logits are not kept for the backward. Wrapped models (DDP,
FSDP, compile) and other causal LMs run their whole forward and are sliced: the same numbers.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from chatforge import distributed as D
from chatforge.model.gpt import GPT


def plain_gpt(model: nn.Module) -> Optional[GPT]:
    """``model`` itself when it is a native GPT with no wrapper around it (no DDP, compile or FSDP), else None."""
    return D.bare(model, GPT)


def next_token_logits(model: nn.Module, ids: torch.Tensor, first: int,
                      attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ids (B, T) -> the logits predicting ids[:, first:], (B, T - first, V): positions first - 1 .. T - 2.
    ``first`` >= 1; ``attention_mask`` (B, T) as the model takes it (None: no padding before a real token)."""
    if not 1 <= first <= ids.shape[1]:
        raise ValueError(f"next_token_logits: first={first} outside 1..{ids.shape[1]}")
    gpt = plain_gpt(model)
    if gpt is not None:
        h = gpt.model(ids, attention_mask)  # (B, T, C)
        return gpt.lm_head(h[:, first - 1:-1])  # (B, T - first, V)
    logits = model(ids, attention_mask=attention_mask) if attention_mask is not None else model(ids)  # (B, T, V)
    return logits[:, first - 1:-1]
