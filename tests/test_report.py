"""`chatforge report`: the report card builds from a run directory's logs (complete or partial)."""

from __future__ import annotations

import json

import pytest

from chatforge.report import build_report, summary_markdown, summary_rows


def write_stage(root, d, stage, *, wall, loss, extra=None, rows=None, samples=None):
    p = root / d
    p.mkdir(parents=True)
    info = {"stage": stage, "wall_s": wall, "metrics": {"train_loss": loss, "steps": 10}, "config": {}, **(extra or {})}
    (p / "chatforge.json").write_text(json.dumps(info))
    rows = rows or [{"kind": "train", "step": s, "loss": loss + (10 - s) * 0.1} for s in range(1, 11)] + \
        [{"kind": "eval", "step": 10, "val_loss": loss + 0.05}]
    (p / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if samples:
        (p / "eval_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))


def gold(m, g):
    return {"gold_score": m, "gold_score_se": 0.01, "gold_score_greedy": g, "gold_score_greedy_se": 0.01,
            "gold_eval": {"components": {"correct": 0.3, "follows": 0.8, "polite": m, "concise": 0.9, "ends": 0.7}}}


def answers(prefix, score):
    return [{"prompt": f"What is {i} plus 1? | pipe", "sampled": f"{prefix} {i + 1}.", "greedy": f"{prefix} greedy",
             "gold_sampled": score, "gold_greedy": score} for i in range(3)]


@pytest.fixture
def run_dir(tmp_path):
    root = tmp_path / "run"
    write_stage(root, "base", "pretrain", wall=100, loss=2.5, extra=gold(0.05, 0.04), samples=answers("base", 0.05))
    write_stage(root, "sft", "sft", wall=60, loss=1.2, extra=gold(0.55, 0.7), samples=answers("Sure!", 0.55))
    write_stage(root, "rm", "rm", wall=50, loss=0.3, extra={
        "accuracy": 0.9, "accuracy_se": 0.015,
        "heldout_eval": {"n_pairs": 400, "n_prompts": 100, "accuracy_by_kind": {
            "content only": {"accuracy": 0.6, "n": 50}, "style only": {"accuracy": 0.95, "n": 350}}, "calibration": [{"lo": 0.0, "hi": 0.5, "n": 50, "predicted": 0.25, "observed": 0.2},
                                                         {"lo": 0.5, "hi": 1.0, "n": 350, "predicted": 0.75, "observed": 0.8}]}},
        rows=[{"kind": "train", "step": s, "loss": 0.6 - s * 0.03, "accuracy": 0.6 + s * 0.02} for s in range(1, 11)]
        + [{"kind": "eval", "step": 10, "val_loss": 0.4, "val_accuracy": 0.88}])
    wr = {"win_rate": 0.7, "win_rate_se": 0.02, "win_rate_lo": 0.66, "win_rate_hi": 0.74, "wins": 250, "ties": 60,
          "losses": 90, "n": 400}
    write_stage(root, "ppo", "ppo", wall=200, loss=0.01, extra={**gold(0.7, 0.72), "win_rate_vs_sft": {"sampled": wr, "greedy": wr}},
                rows=[{"kind": "train", "step": s, "loss": 0.01, "reward": s * 0.1, "kl": s * 0.2,
                       "response_length": 12 - s * 0.3, "entropy": 1.5 - s * 0.05} for s in range(1, 11)],
                samples=answers("Sure! Gladly", 0.7))
    (root / "ppo" / "kl_monitor.json").write_text(json.dumps({"sft_gold": 0.55, "points": [
        {"step_lo": 1, "step_hi": 5, "kl": 0.5, "rm_reward": 0.3, "gold": 0.6, "gold_se": 0.03},
        {"step_lo": 6, "step_hi": 10, "kl": 1.5, "rm_reward": 0.9, "gold": 0.7, "gold_se": 0.03}]}))
    (root / "pipeline.json").write_text(json.dumps({"steps": {
        "data": {"status": "ran", "wall_s": 5}, "tokenizer": {"status": "ran", "wall_s": 3},
        "pairs": {"status": "ran", "wall_s": 20}, "eval": {"status": "ran", "wall_s": 30}}}))
    return root


def test_report_card_from_a_run(run_dir):
    path = build_report(run_dir)
    md = path.read_text()
    assert path == run_dir / "report.md"
    for png in ("losses", "gold_scores", "rm", "ppo", "gold_vs_kl"):
        f = run_dir / "plots" / f"{png}.png"
        assert f.is_file() and f.read_bytes()[:4] == b"\x89PNG", png
        assert f"plots/{png}.png" in md
    table = summary_markdown(run_dir)
    for stage, wall in (("pretrain", "100 s"), ("sft", "60 s"), ("rm", "50 s"), ("ppo", "200 s"), ("pairs", "20 s")):
        line = next(x for x in table.splitlines() if x.startswith(f"| {stage} |"))
        assert wall in line, line
    assert "**468 s**" in table  # 5 + 3 + 100 + 60 + 20 + 50 + 200 + 30
    assert "0.700 ± 0.010" in table and "accuracy 0.900" in table and "win rate vs SFT 0.700 [0.660, 0.740]" in table
    assert "base 0.050 < SFT 0.550 < PPO 0.700: **True**" in md
    assert "PPO not below SFT **True**" in md
    assert "RM held-out accuracy vs noise-free gold: 0.900 ± 0.015 on 400 pairs from 100 prompts" in md
    assert "by what tells the pair apart: content only 0.600 (n=50); style only 0.950 (n=350)" in md
    # side by side: the same prompts answered by base, SFT and PPO; table pipes escaped
    assert "| prompt | base | sft | ppo |" in md
    assert "What is 0 plus 1? \\| pipe | base 1. [0.05] | Sure! 1. [0.55] | Sure! Gladly 1. [0.70] |" in md


def test_report_from_a_partial_run(tmp_path):
    root = tmp_path / "run"
    write_stage(root, "base", "pretrain", wall=12.5, loss=3.0)
    (root / "sft").mkdir()
    (root / "sft" / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 2.0}) + "\n")
    path = build_report(root)
    rows = summary_rows(root)
    assert [r["stage"] for r in rows] == ["pretrain", "sft"] and rows[1]["finished"] is False
    assert (root / "plots" / "losses.png").is_file() and not (root / "plots" / "ppo.png").exists()
    assert "no evaluation samples yet" in path.read_text()


def test_report_command(run_dir, capsys):
    from chatforge import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(run_dir)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "| ppo |" in out and f"report: {run_dir / 'report.md'}" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(run_dir / "missing")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err
