"""Statistics of an RL step over every rank (one all-reduce each), finiteness checks and the final score of a
response (clipping and the missing-EOS penalty)."""

from __future__ import annotations

import torch

from chatforge import distributed as D
from chatforge.trainer import TrainingError


def global_sums(*values: float | torch.Tensor) -> list[float]:
    """Sum scalars over ranks in one all-reduce; device tensors are stacked where they are (no host round trip
    per value: one transfer for the whole list)."""
    dev = next((v.device for v in values if torch.is_tensor(v)), torch.device("cpu"))
    t = torch.stack([v.detach().reshape(()).to(dev, torch.float64) if torch.is_tensor(v)
                     else torch.tensor(float(v), dtype=torch.float64, device=dev) for v in values])  # (n,)
    return D.all_reduce_sum(t).tolist()


def masked_moment_sums(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, sum, sum of squares) of x over mask == 1, float64 scalars on x's device (to add over ranks)."""
    m = mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    return m.sum(), (xd * m).sum(), (xd * xd * m).sum()


def moments(n: float, s: float, s2: float) -> tuple[float, float]:
    """(mean, unbiased variance) from (count, sum, sum of squares); variance 1 below two entries."""
    if n < 2:
        return (s / max(n, 1.0), 1.0)
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0) * n / (n - 1)
    return mean, var


def global_masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, unbiased variance) of x over mask == 1 on every rank together."""
    return moments(*global_sums(*masked_moment_sums(x, mask)))


def check_finite(name: str, x: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise TrainingError(f"step {step + 1}: {bad} non-finite value(s) in {name}; the run stops and the last "
                            f"checkpoint is kept (check the reward model / reward function)")


def final_scores(norm: torch.Tensor, finished: torch.Tensor, rl) -> torch.Tensor:
    """The score each response earns: the normalised reward, clipped to +-rl.reward_clip if set; for a response
    that never ended (when rl.missing_eos_penalty is set) then, by rl.missing_eos_mode:
      'subtract' (default, as TRL): score + penalty (penalty <= 0), so an unfinished response never scores more
                 than the same response finished, and a better unfinished answer can still beat a worse finished one;
      'replace':  the penalty itself, whatever the reward (on a normalised scale a finished answer scored below
                 the penalty then loses to any answer that never ends).
    (B,), (B,) bool -> (B,)."""
    score = norm.float()
    if rl.reward_clip is not None:
        score = score.clamp(-rl.reward_clip, rl.reward_clip)
    p = rl.missing_eos_penalty
    if p is None:
        return score
    unfinished = ~finished.to(score.device)
    mode = getattr(rl, "missing_eos_mode", "subtract")
    if mode == "subtract":
        if p > 0:
            raise ValueError(f"rl.missing_eos_penalty={p}: in 'subtract' mode it must be <= 0")
        return torch.where(unfinished, score + float(p), score)
    if mode == "replace":
        return torch.where(unfinished, torch.full_like(score, float(p)), score)
    raise ValueError(f"rl.missing_eos_mode must be 'subtract' or 'replace', got {mode!r}")
