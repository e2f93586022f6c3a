"""``chatforge export RUN_OR_STAGE_DIR --to tensorboard``: tracker files from metrics.jsonl, after the run."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a stage output directory (holding metrics.jsonl) or a pipeline run directory "
                                "(every stage folder that holds one)")
    p.add_argument("--to", choices=["tensorboard"], default="tensorboard",
                   help="the format to write: TensorBoard event files in each stage's tensorboard/ folder "
                        "(event files already there are replaced)")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    from chatforge.tracking import export_tensorboard, stage_dirs

    root = Path(args.path)
    for d in stage_dirs(root):
        log_dir, n = export_tensorboard(d)
        print(f"{d}: {n} metrics rows -> {log_dir}")
    print(f"view with: tensorboard --logdir {root}")
    return 0
