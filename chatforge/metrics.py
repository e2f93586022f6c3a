"""metrics.jsonl: one JSON object per logged step, appended by rank 0, read by the report.

The same rows also go to the experiment trackers named in ``train.trackers`` (TensorBoard, W&B,
Trackio; :mod:`chatforge.tracking`), with the resolved config as the run's hyper-parameters.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable

from chatforge.checkpoint import atomic_write_text

METRICS_FILE = "metrics.jsonl"


def _clean(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class MetricsLog:
    """Append-only JSON-lines log; ``truncate(step)`` drops rows after a checkpoint's step on resume.

    ``config`` (the stage's resolved Config): its ``train.trackers`` get every row too, and the whole
    config is their hyper-parameters. A tracker whose package is missing is a ConfigError here, before
    any training. ``close()`` finishes the tracker runs (a later row reopens them).
    """

    def __init__(self, out: Path, enabled: bool = True, config: Any = None):
        self.path = Path(out) / METRICS_FILE
        self.enabled = enabled
        self.trackers = None
        names = list(getattr(getattr(config, "train", None), "trackers", None) or [])
        if enabled and names:
            from chatforge.tracking import Trackers

            cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else None
            self.trackers = Trackers(names, Path(out), cfg)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def truncate(self, step: int) -> None:
        """Keep only the rows with ``step <= step`` (a resumed run rewrites what follows)."""
        if self.trackers is not None:
            self.trackers.resumed_at(step)
        if not self.enabled or not self.path.is_file():
            return
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def reset(self) -> None:
        if self.enabled and self.path.is_file():
            self.path.unlink()

    def close(self) -> None:
        """Finish the trackers' runs (flushes their files); metrics.jsonl needs nothing."""
        if self.trackers is not None:
            self.trackers.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl (a folder holding one is accepted too)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a row cut by a crash mid-write
    return rows


def series(rows: Iterable[dict], key: str, kind: str | None = None) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, optionally only from rows of one ``kind`` (train/eval/...)."""
    xs, ys = [], []
    for r in rows:
        if kind is not None and r.get("kind") != kind:
            continue
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r.get("step", 0))
            ys.append(float(v))
    return xs, ys
