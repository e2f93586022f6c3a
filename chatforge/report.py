"""The report card of a run directory: report.md + plots/*.png, read from chatforge.json and metrics.jsonl.

    build_report(run_dir) -> Path          writes <run>/report.md and <run>/plots/*.png (matplotlib, Agg)
    summary_rows(run_dir) -> list[dict]    one row per stage: steps, wall time, final loss, key metrics
    summary_markdown(run_dir) -> str       those rows as a markdown table (printed by `chatforge pipeline`)

A run directory is a pipeline run (pipeline.json, stage folders base/ sft/ rm/ ppo/ ...) or a folder of stage
directories run by hand (any sub-folders holding a stage's chatforge.json or metrics.jsonl); anything else is a
:class:`ReportError`. The demo's card reports its gold judge; any other recipe's card reports what measured it,
the reward model or the recipe's judge function (chatforge/recipe_eval.py), and nothing about gold labels.

Everything here only reads what the stages and the evaluation wrote, so `chatforge report RUN_DIR` rebuilds
the card at any time (also from a run that is partly finished).

The card is put together here; what it reads from a run lives in :mod:`chatforge.report_run`, its plots in
:mod:`chatforge.report_plots`, its tables and text in :mod:`chatforge.report_markdown`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional

from chatforge.checkpoint import atomic_write_text
from chatforge.report_markdown import (acceptance_lines, fmt, recipe_side_by_side, side_by_side, summary_markdown,
                                       summary_rows)
from chatforge.report_plots import plot_gold, plot_kl_monitor, plot_losses, plot_ppo, plot_recipe_eval, plot_rm
from chatforge.report_run import ReportError, is_demo, recipe_eval, run_kind, stage_folders, stage_info

__all__ = ["ReportError", "build_recipe_report", "build_report", "summary_markdown", "summary_rows"]


def plot_section(root: Path, plots: dict[str, tuple[Callable[[Path, Path], Optional[Path]], str]]) -> list[str]:
    """Draw each plot into <root>/plots/ and return the card's "## Plots" lines, one captioned image per plot
    (a plot function that finds nothing to draw returns None and is left out)."""
    folder = root / "plots"
    folder.mkdir(exist_ok=True)
    md = ["## Plots\n"]
    for name, (draw, caption) in plots.items():
        path = draw(root, folder)
        if path is not None:
            md += [f"### {caption}\n", f"![{name}](plots/{path.name})\n"]
    return md


def build_recipe_report(root: Path, kind: str) -> Path:
    """The card of any recipe but the demo (or of a folder of hand-run stages): no gold judge, no label noise."""
    plots = plot_section(root, {
        "losses": (plot_losses, "Loss curves of every stage"),
        "rm": (plot_rm, "Reward model: accuracy during training and on its held-out comparisons, and calibration"),
        "ppo": (plot_ppo, "PPO: reward-model reward, KL to the SFT policy, response length and entropy"),
        "eval": (plot_recipe_eval, "Evaluation scores by model (± 2 standard errors)")})
    what = "pipeline run" if kind == "pipeline" else "folder of stage directories"
    md = [f"# chatforge report card: `{root}`\n", f"A {what}: " + ", ".join(f"{s} ({d.name}/)" for s, d in stage_folders(root))
          + ".\n", "## Summary\n", summary_markdown(root), "", *plots]
    ev = recipe_eval(root)
    if ev.get("models"):
        md += ["## Side by side on the evaluation prompts\n", recipe_side_by_side(ev), ""]
    else:
        md += ["## Evaluation\n", "*(no evaluation samples yet: `chatforge pipeline` evaluates a recipe's models "
               "on its evaluation prompts)*", ""]
    path = root / "report.md"
    atomic_write_text(path, "\n".join(md) + "\n")
    return path


def build_report(root: str | Path) -> Path:
    """Write <root>/report.md and <root>/plots/*.png; returns the report's path. Raises ReportError when the
    folder is neither a pipeline run nor a folder of stage directories."""
    root = Path(root)
    kind = run_kind(root)
    if not is_demo(root):
        return build_recipe_report(root, kind)
    plots = plot_section(root, {
        "losses": (plot_losses, "Loss curves of every stage"),
        "gold": (plot_gold, "Held-out gold score by stage (± 2 standard errors)"),
        "rm": (plot_rm, "Reward model: accuracy during training and calibration on held-out gold-labelled pairs"),
        "ppo": (plot_ppo, "PPO: RM reward, KL to the SFT policy, response length and entropy"),
        "kl": (plot_kl_monitor, "Over-optimisation monitor: gold score and RM reward against KL along PPO")})
    md = [f"# chatforge report card: `{root}`\n", "## Summary\n", summary_markdown(root), ""]
    acc = acceptance_lines(root)
    if acc:
        md += ["## Held-out results\n", *acc, ""]
    md += plots
    ppo = stage_info(root / "ppo")
    comps = {d: stage_info(root / d).get("gold_eval", {}).get("components") for d in ("base", "sft", "ppo", "dpo")}
    comps = {d: c for d, c in comps.items() if c}
    if comps:
        keys = ["correct", "follows", "polite", "concise", "ends"]
        md += ["## Gold judge components (sampled, held-out)\n", "| model | " + " | ".join(keys) + " |",
               "|---" * (len(keys) + 1) + "|"]
        md += [f"| {d} | " + " | ".join(fmt(c.get(k)) for k in keys) + " |" for d, c in comps.items()]
        md.append("")
    mon = root / "ppo" / "kl_monitor.json"
    if mon.is_file() and ppo:
        pts = json.loads(mon.read_text()).get("points", [])
        if pts:
            md += ["## Gold vs RM along PPO\n", "| steps | KL | RM reward | gold (samples) |", "|---|---:|---:|---:|"]
            md += [f"| {p['step_lo']}–{p['step_hi']} | {p['kl']:.2f} | {p['rm_reward']:.3f} | "
                   f"{p['gold']:.3f} ± {p['gold_se']:.3f} |" for p in pts]
            md.append("")
    md += ["## Side by side on held-out prompts\n", side_by_side(root), ""]
    path = root / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path
