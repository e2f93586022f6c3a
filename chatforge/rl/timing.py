"""Where an RL step's time goes: wall-clock seconds per phase, logged in each step's metrics row.

Phases (metrics keys ``<phase>_s``):
  gen      sampling the responses with the engine (the rollout's generation)
  logp     the actor's log-probs of the sampled responses (old log-probs; none when the update's first forward
           provides them, see chatforge/stages/grpo.py and ppo.py)
  ref      the frozen reference's log-probs
  reward   decoding the responses and scoring them (reward model or function)
  value    the critic's values (PPO; none when the update's first forward provides them)
  update   the update epochs (forward, backward, optimizer steps)
What a step spends outside these (advantages, statistics, logging) is ``step_s`` minus their sum.

On an accelerator each phase ends with a synchronisation, so its time is the work it queued, not the time to queue
it (a handful of extra syncs per step, none per micro-batch).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch

PHASES = ("gen", "logp", "ref", "reward", "value", "update")
PHASE_KEYS = tuple(f"{p}_s" for p in PHASES)  # wall-clock keys of a metrics row (not numbers of the algorithm)


class PhaseTimer:
    """Seconds per phase, summed over the ``with timer.phase(name)`` blocks of one step."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = defaultdict(float)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"PhaseTimer: unknown phase {name!r} (known: {', '.join(PHASES)})")
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[name] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        """``{"<phase>_s": seconds}`` for the phases that ran, rounded as step_s is."""
        return {f"{k}_s": round(v, 4) for k, v in self.seconds.items()}
