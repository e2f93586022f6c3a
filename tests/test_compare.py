"""`chatforge compare`: two micro models answer the same prompts, a function judge scores every answer, and the
reported win rate, counts and interval are the ones computed here by hand from the answers; the answers are the
models' own greedy answers; the AlpacaEval export holds them in its format."""

from __future__ import annotations

import json
import math

import pytest

from chatforge import cli
from chatforge.compare import Z95, outcomes, win_rate
from chatforge.engine import Engine
from chatforge.model.load import load_causal_lm
from chatforge.tokenizer import render_prompt
from tests.judges import vowels_mod_3
from tests.micro_models import make_model_dir

PROMPTS = ["is the film good?", "tell me about the plot", "a great story", "why is it slow?", "the jokes",
           "describe the journey", "what about the wit?", "is it dull?", "say something", "warmth"]


def greedy_answers(model_dir, prompts, n):
    model, _, tok = load_causal_lm(model_dir)
    ids = [render_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    res = Engine(model.eval()).generate(ids, n, temperature=0.0, stop_ids=[tok.end_id], pad_id=tok.pad_id)
    return [tok.decode(t[:-1] if t and t[-1] == tok.end_id else t) for t in res.tokens]


def test_win_rate_by_hand():
    s = win_rate([1.0, 1.0, 0.5, 0.0])
    assert s["win_rate"] == 0.625 and (s["wins"], s["ties"], s["losses"]) == (2, 1, 1)
    se = math.sqrt(((0.375 ** 2) * 2 + 0.125 ** 2 + 0.625 ** 2) / 3) / 2  # sample std / sqrt(4)
    assert s["se"] == pytest.approx(se)
    assert s["ci_low"] == pytest.approx(0.625 - 1.959964 * se, abs=1e-6) and s["ci_high"] == 1.0  # clipped
    assert outcomes([3, 1, 2], [1, 1, 5]) == [1.0, 0.5, 0.0]


def test_compare_two_micro_models(tmp_path, capsys):
    a = make_model_dir(tmp_path / "a" / "model", seed=1)
    b = make_model_dir(tmp_path / "b" / "model", seed=2)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out, alpaca = tmp_path / "cmp", tmp_path / "alpaca.json"
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", str(a), str(b), "--prompts", str(prompts), "--judge", "tests.judges:vowels_mod_3",
                  "--out", str(out), "--max-new-tokens", "12", "--alpaca-eval", str(alpaca), "--batch-size", "4"])
    assert e.value.code == 0

    # the answers are each model's greedy answers
    ans_a, ans_b = greedy_answers(a, PROMPTS, 12), greedy_answers(b, PROMPTS, 12)
    rows = [json.loads(x) for x in (out / "compare.jsonl").read_text().splitlines()]
    assert [r["a"] for r in rows] == ans_a and [r["b"] for r in rows] == ans_b and ans_a != ans_b

    # the win rate by hand: 1 per prompt where A's answer has the higher score, 1/2 per tie
    wins = ties = 0
    for p, x, y in zip(PROMPTS, ans_a, ans_b):
        u, v = vowels_mod_3(p, x), vowels_mod_3(p, y)
        wins += u > v
        ties += u == v
    n = len(PROMPTS)
    rate = (wins + 0.5 * ties) / n
    per = [1.0] * wins + [0.5] * ties + [0.0] * (n - wins - ties)
    sd = math.sqrt(sum((x - rate) ** 2 for x in per) / (n - 1))
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["wins"], summary["ties"], summary["n"]) == (wins, ties, n)
    assert summary["win_rate"] == pytest.approx(rate)
    assert summary["ci_low"] == pytest.approx(max(0.0, rate - Z95 * sd / math.sqrt(n)))
    assert summary["ci_high"] == pytest.approx(min(1.0, rate + Z95 * sd / math.sqrt(n)))
    shown = capsys.readouterr().out
    assert f"win rate {rate:.3f}" in shown and "95% normal approximation" in shown

    # side by side, and AlpacaEval's format (A's answers; B's as the reference)
    md = (out / "compare.md").read_text()
    assert "| prompt | a/model | b/model |" in md and md.count("\n| ") == n + 1
    exported = json.loads(alpaca.read_text())
    ref = json.loads((tmp_path / "alpaca_reference.json").read_text())
    assert exported == [{"instruction": p, "output": x, "generator": "a/model"} for p, x in zip(PROMPTS, ans_a)]
    assert [r["output"] for r in ref] == ans_b and {r["generator"] for r in ref} == {"b/model"}


def test_compare_with_a_reward_model_judge(tmp_path):
    """A reward-model directory as the judge: the outcomes follow its raw scores of each (prompt, answer)."""
    from chatforge.model.heads import ScalarModel
    from chatforge.rl.reward import RewardModelScorer
    from chatforge.stages.common import save_model_dir

    a = make_model_dir(tmp_path / "a", seed=1)
    b = make_model_dir(tmp_path / "b", seed=2)
    policy, cfg, tok = load_causal_lm(a)
    rm = ScalarModel.from_trunk(policy, score_std=1.0)
    save_model_dir(rm, tmp_path / "rm", cfg, tok)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:6]))
    with pytest.raises(SystemExit) as e:
        cli.main(["compare", str(a), str(b), "--prompts", str(prompts), "--judge", str(tmp_path / "rm"),
                  "--out", str(tmp_path / "cmp"), "--max-new-tokens", "8"])
    assert e.value.code == 0
    rows = [json.loads(x) for x in (tmp_path / "cmp" / "compare.jsonl").read_text().splitlines()]
    scorer = RewardModelScorer(tmp_path / "rm", normalize=False)
    ra, _ = scorer.score_text(PROMPTS[:6], [r["a"] for r in rows])
    rb, _ = scorer.score_text(PROMPTS[:6], [r["b"] for r in rows])
    assert [r["score_a"] for r in rows] == pytest.approx(ra.tolist())
    assert [r["outcome"] for r in rows] == outcomes(ra.tolist(), rb.tolist())
    summary = json.loads((tmp_path / "cmp" / "summary.json").read_text())
    assert summary["win_rate"] == pytest.approx(sum(outcomes(ra.tolist(), rb.tolist())) / 6)
