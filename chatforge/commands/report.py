"""``chatforge report RUN_DIR``: rebuild a run's report card (report.md + plots/*.png) from its logs.

RUN_DIR is a pipeline run or a folder of stage directories run by hand; anything else is an error saying so.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a pipeline run directory (base/ sft/ rm/ ppo/ ...) or a folder of stage "
                   "directories run by hand")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    from chatforge.report import build_report, summary_markdown

    path = build_report(args.run_dir)
    print(summary_markdown(args.run_dir))
    print(f"\nreport: {path}")
    return 0
