"""Shared helpers of the benchmark scripts: machine info, threads, timing and result tables.

Every ``benchmarks/*_speed.py`` script imports this module (run it from the repository root:
``python benchmarks/<name>_speed.py``), prints a table of results and, with ``--json PATH``,
writes them for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere imports chatforge and benchmarks.*
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    """The CPU model name from lscpu (or platform.processor())."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def cores() -> int:
    """CPU cores this process may use (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def set_threads(n: int = 0) -> int:
    """Fix torch's intra-op thread count (0 = one per usable core) and return it."""
    n = n or cores()
    torch.set_num_threads(n)
    return n


def product_rate(m: int = 1024, k: int = 1024, n: int = 1024, reps: int = 20) -> float:
    """This process's fp32 (m, k) @ (k, n) product rate now, GFLOP/s (best of ``reps``, torch's threads). At
    1024^3 it says how much of the CPU a benchmark gets: on a shared host it drifts (the idle 2-core development
    machine: 180-187 at 2 threads, 88-173 when other jobs ran), so a result records it at the start and the end of
    its run."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return round(2 * m * k * n / best / 1e9, 1)


def machine_info() -> dict:
    """What a result line needs to be comparable: CPU/GPU, cores, threads, versions, date, and the fp32 product
    rate at this moment (:func:`product_rate`)."""
    info = {
        "cpu": cpu_model(),
        "cores": cores(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "fp32_gflops": product_rate(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except Exception:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sync(device: str | torch.device = "cpu") -> None:
    """Wait for queued device work so wall-clock timings are honest."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Tokens/s of one loop: ``warmup`` steps (compile included) excluded from ``measured`` steps."""

    name: str
    tokens_per_step: int
    warmup_s: float = 0.0
    step_s: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def median_step_s(self) -> float:
        s = sorted(self.step_s)
        return s[len(s) // 2] if s else float("nan")

    @property
    def tokens_per_s(self) -> float:
        """Measured tokens / measured seconds (the mean rate over the timed steps)."""
        total = sum(self.step_s)
        return self.tokens_per_step * len(self.step_s) / total if total else float("nan")


def time_steps(name: str, step: Callable[[], None], tokens_per_step: int, warmup: int, steps: int,
               device: str | torch.device = "cpu", **extra) -> Timing:
    """Run ``warmup`` untimed steps (their total time is reported as warmup_s: compilation shows there),
    then ``steps`` timed ones."""
    t = Timing(name, tokens_per_step, extra=dict(extra))
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    t.warmup_s = time.perf_counter() - t0
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        t.step_s.append(time.perf_counter() - t0)
    return t


def print_table(rows: list[dict], columns: list[str], title: Optional[str] = None) -> None:
    """A plain fixed-width table (also valid Markdown)."""
    if title:
        print(f"\n{title}")
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def median_rows(rounds: list[list[dict]], key: str = "loop") -> list[dict]:
    """The rows of one table measured in several rounds -> one row per ``key`` value (first-seen order): each
    numeric column the median of its finite values over the rounds (NaN where it has none), any other column as
    first seen. A ratio column gives the median of the rounds' ratios, each taken between loops of one round."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    names = list(dict.fromkeys(r[key] for rows in rounds for r in rows))
    out = []
    for name in names:
        same = [r for rows in rounds for r in rows if r[key] == name]
        row: dict = {}
        for col in dict.fromkeys(c for r in same for c in r):
            vals = [r[col] for r in same if col in r]
            if col != key and any(number(v) for v in vals):
                xs = [v for v in vals if number(v) and math.isfinite(v)]
                row[col] = statistics.median(xs) if xs else float("nan")
            else:
                row[col] = vals[0]
        out.append(row)
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "n/a"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def write_json(path: Optional[str], payload: dict) -> None:
    """Write results (with machine info) as JSON when a path is given."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o)))
    print(f"results written to {path}")
