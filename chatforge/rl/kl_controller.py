"""KL coefficient controllers for RLHF: a fixed beta, or the adaptive one of Ziegler et al. (2019).

Adaptive (Ziegler et al., "Fine-Tuning Language Models from Human Preferences", sec. 2.2):

    e_t      = clip(KL_t / KL_target - 1, -0.2, 0.2)
    beta_t+1 = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

where KL_t is the mean per-sequence KL of the current rollout batch and n_steps the number of
sequences it held (the global batch). The state (beta) is saved in checkpoints for exact resume.
"""

from __future__ import annotations

from typing import Optional


class FixedKLController:
    """beta never changes."""

    def __init__(self, init: float):
        self.value = float(init)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, s: dict) -> None:
        self.value = float(s["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller driving the per-sequence KL towards ``target`` (see the module docstring)."""

    def __init__(self, init: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL controller: target ({target}) and horizon ({horizon}) must be > 0")
        super().__init__(init)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move beta after a batch of ``n_steps`` sequences whose mean KL was ``current_kl``; returns beta."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def make_kl_controller(init: float, target: Optional[float], horizon: int) -> FixedKLController:
    """Fixed beta when ``target`` is None, else the adaptive controller."""
    return FixedKLController(init) if target is None else AdaptiveKLController(init, target, horizon)
