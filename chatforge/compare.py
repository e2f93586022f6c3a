"""Model against model on the user's prompts: answers, a judge, a win rate with its confidence interval.

    a = answers("runs/tiny/ppo", prompts)         # greedy by default, chatforge's engine
    b = answers("runs/tiny/sft", prompts)
    sa, sb = judge_scores(judge, prompts, a), judge_scores(judge, prompts, b)
    summary = win_rate(outcomes(sa, sb))          # A's wins count 1, ties 1/2, losses 0

The judge scores one answer at a time, on text only: a reward model directory (``chatforge rm`` output or any
HF sequence-classification model with one label; raw scores) or ``module:function`` with
``function(prompt: str, response: str) -> float`` (as ``--rl.reward_fn``). The interval is the 95% normal
approximation over prompts: mean outcome +- 1.96 x sample std / sqrt(n), clipped to [0, 1].
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from chatforge.evaluate import mean_se, outcome_counts, outcomes  # noqa: F401  (outcomes: this module's API)

Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def win_rate(results: Sequence[float]) -> dict:
    """Win rate of A (ties count half) with its 95% normal-approximation interval over prompts."""
    if not results:
        raise ValueError("no prompts to compare")
    mean, se = mean_se(results)
    return {"n": len(results), **outcome_counts(results), "win_rate": mean, "se": se,
            "ci_low": max(0.0, mean - Z95 * se), "ci_high": min(1.0, mean + Z95 * se),
            "interval": "95% normal approximation over prompts (ties count 1/2)"}


def prompt_text(messages: list[dict]) -> str:
    """What a judge and AlpacaEval read as the instruction: the last user message."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


@torch.inference_mode()
def answers(model_dir: str | Path, prompts: Sequence[list[dict]], *, max_new_tokens: int = 128,
            temperature: float = 0.0, seed: int = 0, batch_size: int = 32, device: str = "cpu",
            sources: Sequence[str] | None = None) -> list[str]:
    """The model's answers to chat prompts (message lists), in the chat format, batched on chatforge's engine."""
    from chatforge.engine import Engine
    from chatforge.model.load import load_causal_lm
    from chatforge.tokenizer import render_prompt

    model, cfg, tok = load_causal_lm(model_dir, device)
    model.eval()
    ids = [render_prompt(tok, m) for m in prompts]
    for i, p in enumerate(ids):
        if len(p) >= cfg.block_size:
            where = sources[i] if sources else f"prompt {i + 1}"
            raise ValueError(f"{where}: the prompt is {len(p)} tokens, no room to answer in the context of "
                             f"{cfg.block_size} tokens of {model_dir}")
    gen = torch.Generator(device=device).manual_seed(seed)
    engine, out = Engine(model), []
    for s in range(0, len(ids), batch_size):
        res = engine.generate(ids[s : s + batch_size], max_new_tokens, temperature=temperature,
                              stop_ids=[tok.end_id], pad_id=tok.pad_id, generator=gen)
        out += [tok.decode(t[:-1] if t and t[-1] == tok.end_id else t) for t in res.tokens]
    return out


def judge_scores(judge: str, prompts: Sequence[list[dict]], responses: Sequence[str], device: str = "cpu") -> list[float]:
    """Scores of (prompt, response) pairs by a reward model directory or a ``module:function``."""
    from chatforge.rl.reward import FunctionReward, RewardModelScorer

    if Path(judge).is_dir():
        raw, _ = RewardModelScorer(judge, device, normalize=False).score_text(list(prompts), list(responses))
    else:
        raw, _ = FunctionReward(judge).score_text([prompt_text(m) for m in prompts], list(responses))
    return [float(x) for x in raw]
