"""The report card's plots (matplotlib, Agg): loss curves, the reward model's accuracy and calibration, PPO's
training signals, the over-optimisation monitor, gold scores by stage and a recipe's evaluation scores; each
``plot_*(root, out)`` writes one PNG into ``out`` and returns its path (None when the run has nothing to plot)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from chatforge.metrics import read_metrics, series
from chatforge.report_run import STAGE_DIRS, is_demo, recipe_eval, stage_folder, stage_folders, stage_info

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write and close one figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_losses(root: Path, out: Path) -> Optional[Path]:
    stages = stage_folders(root)
    if not stages:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(stages), figsize=(4 * len(stages), 3.2), squeeze=False)
    for ax, (stage, d) in zip(axes[0], stages):
        rows = read_metrics(d)
        for key, kind, label in (("loss", "train", "train"), ("val_loss", "eval", "val")):
            xs, ys = series(rows, key, kind)
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if kind == "eval" else None, ms=3)
        ax.set_title(f"{stage} loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    return _save(plt, fig, out / "losses.png")


def plot_rm(root: Path, out: Path) -> Optional[Path]:
    d = stage_folder(root, "rm")
    rows, info = read_metrics(d), stage_info(d)
    if not rows and not info:
        return None
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = (("train (noisy labels)", "held-out (gold labels)") if is_demo(root) else
             ("train", "held-out comparisons"))
    for key, kind, label in (("accuracy", "train", names[0]), ("val_accuracy", "eval", names[1])):
        xs, ys = series(rows, key, kind)
        if xs:
            a1.plot(xs, ys, label=label, marker="o" if kind == "eval" else None, ms=3)
    if "accuracy" in info:
        a1.axhline(info["accuracy"], ls="--", c="k", lw=0.8, label=f"final held-out {info['accuracy']:.3f}")
    a1.set_title("RM accuracy")
    a1.set_xlabel("step")
    a1.set_ylim(0.4, 1.02)
    a1.legend(fontsize=8)
    table = info.get("heldout_eval", {}).get("calibration") or info.get("calibration") or []
    if table:
        xs = [(t["lo"] + t["hi"]) / 2 if "lo" in t else t.get("predicted", t.get("confidence", 0)) for t in table]
        ys = [t.get("observed", t.get("accuracy", 0)) for t in table]
        a2.plot([0, 1], [0, 1], c="grey", lw=0.8, ls="--")
        a2.plot(xs, ys, marker="o")
    a2.set_title("RM calibration (held-out)")
    a2.set_xlabel("predicted P(first preferred)")
    a2.set_ylabel("observed")
    return _save(plt, fig, out / "rm.png")


def plot_ppo(root: Path, out: Path) -> Optional[Path]:
    d = stage_folder(root, "ppo")
    rows = read_metrics(d)
    if not rows:
        return None
    plt = _plt()
    keys = [("reward", "RM reward (normalised)"), ("kl", "KL to SFT (nats/seq)"),
            ("response_length", "response length (tokens)"), ("entropy", "entropy (nats/token)")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.2))
    for ax, (k, title) in zip(axes, keys):
        xs, ys = series(rows, k, "train")
        if xs:
            ax.plot(xs, ys, lw=0.8, alpha=0.5)
            w = max(1, len(ys) // 20)
            sm = [sum(ys[max(0, i - w + 1):i + 1]) / len(ys[max(0, i - w + 1):i + 1]) for i in range(len(ys))]
            ax.plot(xs, sm, lw=1.5)
        ax.set_title(title)
        ax.set_xlabel("step")
    return _save(plt, fig, out / "ppo.png")


def plot_kl_monitor(root: Path, out: Path) -> Optional[Path]:
    p = root / "ppo" / "kl_monitor.json"
    if not p.is_file():
        return None
    mon = json.loads(p.read_text())
    pts = mon.get("points", [])
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    kl = [0.0] + [q["kl"] for q in pts] if "sft_gold" in mon else [q["kl"] for q in pts]
    gold = ([mon["sft_gold"]] if "sft_gold" in mon else []) + [q["gold"] for q in pts]
    ax.plot(kl, gold, marker="o", c="tab:green", label="gold score (rollout samples; KL 0 = SFT held-out)")
    ax.set_xlabel("KL(policy || SFT), nats per response")
    ax.set_ylabel("gold score")
    ax2 = ax.twinx()
    ax2.plot([q["kl"] for q in pts], [q["rm_reward"] for q in pts], marker="s", c="tab:blue", label="RM reward")
    ax2.set_ylabel("RM reward (normalised)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax.set_title("over-optimisation monitor: gold vs RM along PPO")
    return _save(plt, fig, out / "gold_vs_kl.png")


def plot_gold(root: Path, out: Path) -> Optional[Path]:
    bars = [(d, stage_info(root / d)) for _, d in STAGE_DIRS]
    bars = [(d, i) for d, i in bars if "gold_score" in i]
    if not bars:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(bars))
    ax.bar([i - 0.2 for i in x], [i["gold_score"] for _, i in bars], 0.4, yerr=[2 * i["gold_score_se"] for _, i in bars],
           label="sampled (T=1)", capsize=3)
    ax.bar([i + 0.2 for i in x], [i["gold_score_greedy"] for _, i in bars], 0.4,
           yerr=[2 * i["gold_score_greedy_se"] for _, i in bars], label="greedy", capsize=3)
    ax.set_xticks(list(x), [d for d, _ in bars])
    ax.set_ylim(0, 1)
    ax.set_ylabel("gold score (± 2 SE)")
    ax.set_title("held-out gold score by stage")
    ax.legend(fontsize=8)
    return _save(plt, fig, out / "gold_scores.png")


def plot_recipe_eval(root: Path, out: Path) -> Optional[Path]:
    """Reward-model (and judge) scores by model, ± 2 standard errors (non-demo recipes)."""
    ev = recipe_eval(root)
    models = ev.get("models", {})
    keys = [(k, label) for k, label in (("rm_score", "reward model (normalised)"), ("judge_score", "judge"))
            if any(k in r for r in models.values())]
    if not keys:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, (k, label) in zip(axes[0], keys):
        names = [n for n, r in models.items() if k in r]
        ax.bar(names, [models[n][k] for n in names], yerr=[2 * models[n][k + "_se"] for n in names], capsize=3)
        ax.set_title(f"{label} score by model")
        ax.set_ylabel("mean score (± 2 SE)")
    return _save(plt, fig, out / "eval_scores.png")
