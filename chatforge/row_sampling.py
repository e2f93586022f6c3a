"""Per-token probabilities for the scheduler: :func:`sample_rows` samples one next token per row with its
own temperature, top-p and generator (the law of :func:`chatforge.engine.sample_next`), and
:func:`prompt_logprobs` gives the log-probs of a given token sequence from one forward."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, V) logits, per-row temperature (B,) and top_p (B,), one generator per row -> (next ids (B,),
    log_softmax(logits) fp32 (B, V)). Row by row the same law and draws as :func:`chatforge.engine.sample_next`."""
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)  # (B, V) the model's distribution
    nxt = logits.argmax(dim=-1)  # (B,) greedy rows keep this
    hot = (temperature > 0).nonzero().flatten().tolist()
    if hot:
        t = temperature[hot].to(logits)[:, None]  # (h, 1)
        x = logits[hot] / t  # (h, V); x / 1.0 == x exactly
        p_keep = top_p[hot].to(logits)  # (h,)
        if bool((p_keep < 1.0).any()):
            sorted_x, order = torch.sort(x, dim=-1, descending=True)  # (h, V)
            probs = torch.softmax(sorted_x, dim=-1)
            drop_sorted = (probs.cumsum(-1) - probs) >= p_keep[:, None]  # (h, V); the top-1 always stays
            drop_sorted &= (p_keep < 1.0)[:, None]
            x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted), float("-inf"))
        probs = torch.softmax(x, dim=-1)  # (h, V)
        cdf = probs.cpu().to(torch.float64).cumsum(-1)  # (h, V)
        u = torch.cat([torch.rand(1, 1, generator=generators[i], dtype=torch.float64) for i in hot])  # (h, 1)
        drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(1).clamp_(max=x.shape[-1] - 1)
        nxt[hot] = drawn.to(nxt.device)
    return nxt, logp


@torch.inference_mode()
def prompt_logprobs(model: nn.Module, ids: Sequence[int], top: int = 0
                    ) -> tuple[list[Optional[float]], list[Optional[list[tuple[int, float]]]]]:
    """Log-probs of each token of ``ids`` given the ones before it, from one full forward (no cache):
    ([None, lp_1, ..., lp_{T-1}], per position the ``top`` most likely (id, log-prob) or None)."""
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], dtype=torch.long, device=device)  # (1, T)
    logp = torch.log_softmax(model(x)[0].float(), dim=-1)  # (T, V): row t predicts token t + 1
    tgt = x[0, 1:]  # (T-1,)
    lps = logp[:-1].gather(1, tgt[:, None]).squeeze(1).tolist()
    tops: list[Optional[list[tuple[int, float]]]] = [None]
    if top > 0:
        v, i = torch.topk(logp[:-1], min(top, logp.shape[-1]), dim=-1)  # (T-1, k)
        tops += [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
    else:
        tops += [None] * len(lps)
    return [None] + lps, tops
