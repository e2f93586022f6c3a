"""The report card's markdown pieces: the per-stage summary table, the held-out results of a demo run, the
side-by-side answer tables, and number formatting."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from chatforge.report_run import is_demo, pipeline_steps, recipe_eval, stage_folders, stage_info

N_SIDE_BY_SIDE = 8


def fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(m, se) -> str:
    return "–" if m is None else f"{m:.3f} ± {se:.3f}" if se is not None else f"{m:.3f}"


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
    steps = pipeline_steps(root)
    demo = is_demo(root)
    rows = []
    for name in ("data", "tokenizer"):
        if name in steps:
            rows.append({"stage": name, "wall_s": steps[name].get("wall_s")})
    for stage, d in stage_folders(root):
        info = stage_info(d)
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
        line = (f"| {r['stage']} | {fmt(r.get('steps'))} | {fmt(w, 0) + ' s' if w is not None else '–'} | "
                f"{fmt(r.get('train_loss'))} | {'; '.join(held) or '–'} |")
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
        cells += [_pm(r.get("length"), r.get("length_se")), fmt(r.get("ends")), _pm(r.get("kl_to_sft"), r.get("kl_to_sft_se"))]
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


def acceptance_lines(root: Path) -> list[str]:
    base, sft, ppo, rm = (stage_info(root / d) for d in ("base", "sft", "ppo", "rm"))
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
