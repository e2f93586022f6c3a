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
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from chatforge.checkpoint import atomic_write_text
from chatforge.errors import UserInputError
from chatforge.metrics import read_metrics, series

STAGE_DIRS = [("pretrain", "base"), ("sft", "sft"), ("rm", "rm"), ("ppo", "ppo"), ("dpo", "dpo"), ("grpo", "grpo")]
STAGE_ORDER = [s for s, _ in STAGE_DIRS]
N_SIDE_BY_SIDE = 8


class ReportError(UserInputError):
    """The folder is not something a report card can be built from."""


def _info(d: Path) -> dict:
    p = d / "chatforge.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(m, se) -> str:
    return "–" if m is None else f"{m:.3f} ± {se:.3f}" if se is not None else f"{m:.3f}"


def _stage_of(d: Path) -> Optional[str]:
    """The stage a folder holds (its chatforge.json's "stage", else its pipeline name), or None."""
    st = _info(d).get("stage")
    if st in STAGE_ORDER:
        return st
    by_dir = {dd: s for s, dd in STAGE_DIRS}
    if d.name in by_dir and ((d / "chatforge.json").is_file() or (d / "metrics.jsonl").is_file()):
        return by_dir[d.name]
    return None


def _stages(root: Path) -> list[tuple[str, Path]]:
    """(stage, folder) of every stage directory in ``root``: the pipeline's names first, in stage order, then
    other sub-folders holding a stage run (hand-run stage directories keep their names)."""
    found = [(s, root / d) for s, d in STAGE_DIRS if _stage_of(root / d)]
    known = {d for _, d in found}
    if root.is_dir():
        extra = [(_stage_of(d), d) for d in sorted(root.iterdir()) if d.is_dir() and d not in known]
        found += sorted([(s, d) for s, d in extra if s], key=lambda x: STAGE_ORDER.index(x[0]))
    return found


def _dir_of(root: Path, stage: str) -> Path:
    """The folder of ``stage`` (the pipeline's name when present, else the first hand-run folder of it)."""
    return next((d for s, d in _stages(root) if s == stage), root / dict(STAGE_DIRS)[stage])


def run_kind(root: str | Path) -> str:
    """'pipeline' (pipeline.json), 'stages' (a folder of stage directories), else a ReportError."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist")
    if (root / "pipeline.json").is_file():
        return "pipeline"
    if _stages(root):
        return "stages"
    raise ReportError(f"{root} is neither a pipeline run (no pipeline.json) nor a folder of stage directories "
                      f"(no sub-folder holds a stage's chatforge.json or metrics.jsonl); point at the run's root")


def is_demo(root: Path) -> bool:
    """A run of the built-in demo world (its gold judge measured it)."""
    p = root / "pipeline.json"
    try:
        recipe = json.loads(p.read_text()).get("recipe") if p.is_file() else None
    except json.JSONDecodeError:
        recipe = None
    if isinstance(recipe, dict) and "data" in recipe:
        return recipe["data"] == "demo"
    return (root / "data" / "world.json").is_file() or any("gold_score" in _info(d) for _, d in _stages(root))


def recipe_eval(root: Path) -> dict:
    p = root / "eval" / "results.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _pipeline_steps(root: Path) -> dict:
    p = root / "pipeline.json"
    try:
        return json.loads(p.read_text()).get("steps", {}) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _final_loss(info: dict) -> Optional[float]:
    m = info.get("metrics", {})
    for k in ("train_loss", "loss"):
        if isinstance(m.get(k), (int, float)):
            return float(m[k])
    return None


def _val_loss(info: dict) -> Optional[float]:
    v = info.get("metrics", {}).get("eval_val_loss")
    return float(v) if isinstance(v, (int, float)) else None


def summary_rows(root: str | Path) -> list[dict]:
    """One row per stage found in the run directory (plus the pipeline's data/tokenizer/pairs/eval steps)."""
    root = Path(root)
    steps = _pipeline_steps(root)
    demo = is_demo(root)
    rows = []
    for name in ("data", "tokenizer"):
        if name in steps:
            rows.append({"stage": name, "wall_s": steps[name].get("wall_s")})
    for stage, d in _stages(root):
        info = _info(d)
        m = info.get("metrics", {})
        row = {"stage": stage, "dir": d.name, "steps": m.get("steps"), "wall_s": info.get("wall_s"),
               "train_loss": _final_loss(info), "val_loss": _val_loss(info), "finished": bool(info)}
        if "gold_score" in info:
            row["gold"] = (info["gold_score"], info.get("gold_score_se"))
            row["gold_greedy"] = (info.get("gold_score_greedy"), info.get("gold_score_greedy_se"))
        if stage == "rm" and demo and "accuracy" in info:  # the demo's held-out pairs carry gold labels
            row["rm_accuracy"] = (info["accuracy"], info.get("accuracy_se"))
        elif stage == "rm" and isinstance(m.get("eval_val_accuracy"), (int, float)):
            row["rm_val_accuracy"] = float(m["eval_val_accuracy"])  # the rm stage's own held-out comparisons
        wr = info.get("win_rate_vs_sft", {}).get("sampled")
        if wr:
            row["win_rate"] = wr
        if stage in ("ppo", "grpo"):
            row["kl"] = m.get("train_kl")
        rows.append(row)
        if stage == "sft" and "pairs" in steps:
            rows.append({"stage": "pairs", "wall_s": steps["pairs"].get("wall_s")})
    for name in ("eval", "report"):
        if name in steps and steps[name].get("status") != "skipped":
            rows.append({"stage": name, "wall_s": steps[name].get("wall_s")})
    return rows


def summary_markdown(root: str | Path) -> str:
    """The per-stage summary table (markdown), with the total wall time (gold columns for the demo only)."""
    root = Path(root)
    rows = summary_rows(root)
    demo = is_demo(root)
    if demo:
        head = ("| stage | steps | wall time | final train loss | held-out | gold score (sampled, T=1) | "
                "gold score (greedy) |\n|---|---:|---:|---:|---|---|---|")
    else:
        head = "| stage | steps | wall time | final train loss | held-out |\n|---|---:|---:|---:|---|"
    lines = [head]
    total = 0.0
    for r in rows:
        w = r.get("wall_s")
        total += w or 0.0
        held = []
        if r.get("val_loss") is not None:
            held.append(f"val loss {r['val_loss']:.3f}")
        if "rm_accuracy" in r:
            a, se = r["rm_accuracy"]
            held.append(f"accuracy {a:.3f} ± {se or 0:.3f} vs gold")
        if "win_rate" in r:
            wr = r["win_rate"]
            held.append(f"win rate vs SFT {wr['win_rate']:.3f} [{wr['win_rate_lo']:.3f}, {wr['win_rate_hi']:.3f}]")
        if "rm_val_accuracy" in r:
            held.append(f"accuracy {r['rm_val_accuracy']:.3f} on held-out comparisons")
        if r.get("kl") is not None:
            held.append(f"KL {r['kl']:.2f}")
        g, gg = r.get("gold"), r.get("gold_greedy")
        line = (f"| {r['stage']} | {_fmt(r.get('steps'))} | {_fmt(w, 0) + ' s' if w is not None else '–'} | "
                f"{_fmt(r.get('train_loss'))} | {'; '.join(held) or '–'} |")
        if demo:
            line += f" {_pm(*g) if g else '–'} | {_pm(*gg) if gg and gg[0] is not None else '–'} |"
        lines.append(line)
    lines.append(f"| **total** | | **{total:.0f} s** | | |" + (" | |" if demo else ""))
    text = "\n".join(lines)
    ev = recipe_eval(root)
    if not demo and ev.get("models"):
        text += "\n\n" + eval_markdown(ev)
    return text


def _wr(w: Optional[dict]) -> str:
    return "–" if not w else f"{w['win_rate']:.3f} [{w['win_rate_lo']:.3f}, {w['win_rate_hi']:.3f}]"


def eval_markdown(ev: dict) -> str:
    """The evaluation of a (non-demo) recipe: one row per model, each figure named by what measured it."""
    rm, judge = ev.get("reward_model"), ev.get("judge")
    cols = ["model"]
    if rm:
        cols.append("reward-model score (normalised)")
    if judge:
        cols.append("judge score")
    cols += ["length (tokens)", "ends properly", "KL to SFT (nats/answer)"]
    if rm:
        cols.append("win rate vs SFT (reward model)")
    if judge:
        cols.append("win rate vs SFT (judge)")
    lines = ["| " + " | ".join(cols) + " |", "|---" + "|---:" * (len(cols) - 1) + "|"]
    for name, r in ev["models"].items():
        cells = [name]
        if rm:
            cells.append(_pm(r.get("rm_score"), r.get("rm_score_se")))
        if judge:
            cells.append(_pm(r.get("judge_score"), r.get("judge_score_se")))
        cells += [_pm(r.get("length"), r.get("length_se")), _fmt(r.get("ends")), _pm(r.get("kl_to_sft"), r.get("kl_to_sft_se"))]
        if rm:
            cells.append(_wr(r.get("win_rate_vs_sft_rm")))
        if judge:
            cells.append(_wr(r.get("win_rate_vs_sft_judge")))
        lines.append("| " + " | ".join(cells) + " |")
    what = []
    if rm:
        what.append(f"the reward model `{rm}`")
    if judge:
        what.append(f"the judge `{judge}`")
    lines.append(f"\n{ev['n_prompts']} evaluation prompts, one answer each sampled at temperature 1 (mean ± standard "
                 f"error); scored by {' and '.join(what) or 'no reward model or judge'}; win rates prompt by prompt "
                 f"against the SFT model's answer (ties count half, 95% interval).")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ plots
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
    stages = _stages(root)
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
    d = _dir_of(root, "rm")
    rows, info = read_metrics(d), _info(d)
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
    d = _dir_of(root, "ppo")
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
    bars = [(d, _info(root / d)) for _, d in STAGE_DIRS]
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


# ----------------------------------------------------------------------------------------------------- report
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip() or "*(empty)*"


def side_by_side(root: Path, n: int = N_SIDE_BY_SIDE) -> str:
    """The first ``n`` held-out prompts answered by base, SFT and PPO (and DPO), sampled at T=1 and greedy."""
    from chatforge.evaluate import read_eval_samples

    cols = [(d, read_eval_samples(root / d)) for d in ("base", "sft", "ppo", "dpo")]
    cols = [(d, s) for d, s in cols if s]
    if not cols:
        return "*(no evaluation samples yet)*"
    out = []
    for mode in ("sampled", "greedy"):
        out.append(f"\n**{mode}** ({'temperature 1' if mode == 'sampled' else 'argmax'}); gold score in brackets\n")
        out.append("| prompt | " + " | ".join(d for d, _ in cols) + " |")
        out.append("|---" * (len(cols) + 1) + "|")
        for i in range(min(n, len(cols[0][1]))):
            cells = [_cell(cols[0][1][i]["prompt"])]
            for _, s in cols:
                r = s[i]
                cells.append(f"{_cell(r[mode])} [{r['gold_' + mode]:.2f}]")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def _acceptance(root: Path) -> list[str]:
    base, sft, ppo, rm = (_info(root / d) for d in ("base", "sft", "ppo", "rm"))
    lines = []
    if all("gold_score" in i for i in (base, sft, ppo)):
        gain, se = ppo["gold_score"] - sft["gold_score"], math.hypot(ppo["gold_score_se"], sft["gold_score_se"])
        lines.append(f"- gold (sampled): base {base['gold_score']:.3f} < SFT {sft['gold_score']:.3f} < PPO "
                     f"{ppo['gold_score']:.3f}: **{base['gold_score'] < sft['gold_score'] < ppo['gold_score']}**; "
                     f"PPO − SFT = {gain:+.3f} (SE {se:.3f}, {gain / se if se else float('nan'):.1f} SE)")
        lines.append(f"- gold (greedy): SFT {sft['gold_score_greedy']:.3f}, PPO {ppo['gold_score_greedy']:.3f}: "
                     f"PPO not below SFT **{ppo['gold_score_greedy'] >= sft['gold_score_greedy']}**")
    wr = ppo.get("win_rate_vs_sft", {})
    if wr:
        for mode in ("sampled", "greedy"):
            w = wr[mode]
            lines.append(f"- PPO-over-SFT win rate ({mode}, ties half): {w['win_rate']:.3f} "
                         f"[95% CI {w['win_rate_lo']:.3f}, {w['win_rate_hi']:.3f}] "
                         f"({w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")
    if "accuracy" in rm:
        he = rm.get("heldout_eval", {})
        se = f" ± {rm['accuracy_se']:.3f}" if "accuracy_se" in rm else ""
        prompts = f" from {he['n_prompts']} prompts" if "n_prompts" in he else ""
        noise = rm.get("config", {}).get("demo", {}).get("label_noise", "?")  # runs made before the recipe section
        world = root / "data" / "world.json"
        if world.is_file():
            noise = json.loads(world.read_text()).get("spec", {}).get("label_noise", noise)
        lines.append(f"- RM held-out accuracy vs noise-free gold: {rm['accuracy']:.3f}{se} on {he.get('n_pairs', '?')} "
                     f"pairs{prompts} (trained with label noise {noise})")
        kinds = he.get("accuracy_by_kind", {})
        if len(kinds) > 1:
            lines.append("- RM held-out accuracy by what tells the pair apart: " + "; ".join(
                f"{k} {v['accuracy']:.3f} (n={v['n']})" for k, v in kinds.items()))
    return lines


def recipe_side_by_side(ev: dict) -> str:
    """The evaluation's first prompts answered by every model (sampled, T=1), reward-model score in brackets."""
    rows = ev.get("side_by_side", [])
    if not rows:
        return "*(no evaluation answers yet)*"
    names = [n for n in ev.get("models", {}) if n in rows[0]]
    by = "rm" if ev.get("reward_model") else "judge" if ev.get("judge") else None
    what = {"rm": "reward-model score", "judge": "judge score"}.get(by, "")
    out = [f"\nsampled at temperature 1{'; ' + what + ' in brackets' if what else ''}\n",
           "| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for r in rows:
        p = r["prompt"] if isinstance(r["prompt"], str) else " / ".join(m["content"] for m in r["prompt"])
        cells = [_cell(p)] + [_cell(r[n]["response"]) + (f" [{r[n][by]:.2f}]" if by in r[n] else "") for n in names]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def build_recipe_report(root: Path, kind: str) -> Path:
    """The card of any recipe but the demo (or of a folder of hand-run stages): no gold judge, no label noise."""
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    made = {name: fn(root, plots) for name, fn in (("losses", plot_losses), ("rm", plot_rm), ("ppo", plot_ppo),
                                                    ("eval", plot_recipe_eval))}
    what = "pipeline run" if kind == "pipeline" else "folder of stage directories"
    md = [f"# chatforge report card: `{root}`\n", f"A {what}: " + ", ".join(f"{s} ({d.name}/)" for s, d in _stages(root))
          + ".\n", "## Summary\n", summary_markdown(root), ""]
    ev = recipe_eval(root)
    captions = {"losses": "Loss curves of every stage",
                "rm": "Reward model: accuracy during training and on its held-out comparisons, and calibration",
                "ppo": "PPO: reward-model reward, KL to the SFT policy, response length and entropy",
                "eval": "Evaluation scores by model (± 2 standard errors)"}
    md.append("## Plots\n")
    for name, path in made.items():
        if path is not None:
            md += [f"### {captions[name]}\n", f"![{name}](plots/{path.name})\n"]
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
    plots = root / "plots"
    plots.mkdir(exist_ok=True)
    made = {name: fn(root, plots) for name, fn in (("losses", plot_losses), ("gold", plot_gold), ("rm", plot_rm),
                                                    ("ppo", plot_ppo), ("kl", plot_kl_monitor))}
    md = [f"# chatforge report card: `{root}`\n", "## Summary\n", summary_markdown(root), ""]
    acc = _acceptance(root)
    if acc:
        md += ["## Held-out results\n", *acc, ""]
    captions = {"losses": "Loss curves of every stage", "gold": "Held-out gold score by stage (± 2 standard errors)",
                "rm": "Reward model: accuracy during training and calibration on held-out gold-labelled pairs",
                "ppo": "PPO: RM reward, KL to the SFT policy, response length and entropy",
                "kl": "Over-optimisation monitor: gold score and RM reward against KL along PPO"}
    md.append("## Plots\n")
    for name, path in made.items():
        if path is not None:
            md += [f"### {captions[name]}\n", f"![{name}](plots/{path.name})\n"]
    ppo = _info(root / "ppo")
    comps = {d: _info(root / d).get("gold_eval", {}).get("components") for d in ("base", "sft", "ppo", "dpo")}
    comps = {d: c for d, c in comps.items() if c}
    if comps:
        keys = ["correct", "follows", "polite", "concise", "ends"]
        md += ["## Gold judge components (sampled, held-out)\n", "| model | " + " | ".join(keys) + " |",
               "|---" * (len(keys) + 1) + "|"]
        md += [f"| {d} | " + " | ".join(_fmt(c.get(k)) for k in keys) + " |" for d, c in comps.items()]
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
