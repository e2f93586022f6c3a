"""``chatforge export RUN_OR_STAGE_DIR --to tensorboard``: tracker files from metrics.jsonl, after the run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

from chatforge.metrics import METRICS_FILE, read_metrics
from chatforge.tracking import TENSORBOARD_DIR, TensorBoardTracker, check_trackers


def stage_dirs(path: Path) -> list[Path]:
    """``path`` itself when it holds a metrics.jsonl, else its sub-folders that do (a pipeline run)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    if (path / METRICS_FILE).is_file():
        return [path]
    found = sorted(d for d in path.iterdir() if d.is_dir() and (d / METRICS_FILE).is_file())
    if not found:
        raise FileNotFoundError(f"{path}: no {METRICS_FILE} in it or in its stage folders")
    return found


def run_config(stage_dir: Path) -> Optional[dict]:
    """The resolved config a stage recorded in its chatforge.json (None when absent)."""
    f = Path(stage_dir) / "chatforge.json"
    try:
        return json.loads(f.read_text(encoding="utf-8")).get("config")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def export_tensorboard(stage_dir: Path, log_dir: Optional[Path] = None) -> tuple[Path, int]:
    """Write TensorBoard event files from a stage's metrics.jsonl -> (log dir, rows written).

    ``log_dir`` defaults to ``<stage_dir>/tensorboard`` (where ``--train.trackers=tensorboard`` writes);
    event files already there are replaced.
    """
    check_trackers(["tensorboard"])
    stage_dir = Path(stage_dir)
    log_dir = Path(log_dir) if log_dir is not None else stage_dir / TENSORBOARD_DIR
    if log_dir.is_dir():
        for f in log_dir.glob("events.out.tfevents.*"):
            f.unlink()
    rows = read_metrics(stage_dir)
    tb = TensorBoardTracker(stage_dir, run_config(stage_dir), log_dir=log_dir)
    try:
        for r in rows:
            tb.log(r)
    finally:
        tb.close()
    return log_dir, len(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a stage output directory (holding metrics.jsonl) or a pipeline run directory "
                                "(every stage folder that holds one)")
    p.add_argument("--to", choices=["tensorboard"], default="tensorboard",
                   help="the format to write: TensorBoard event files in each stage's tensorboard/ folder "
                        "(event files already there are replaced)")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    root = Path(args.path)
    for d in stage_dirs(root):
        log_dir, n = export_tensorboard(d)
        print(f"{d}: {n} metrics rows -> {log_dir}")
    print(f"view with: tensorboard --logdir {root}")
    return 0
