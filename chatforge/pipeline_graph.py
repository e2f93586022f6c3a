"""The pipeline's step graph: the steps in order, what each step needs upstream, the stage aliases of the
command line, and which steps a change to one step reruns (:func:`downstream`)."""

from __future__ import annotations

TRAIN_STAGES = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")
STEPS = ("data", "tokenizer", "pretrain", "sft", "pairs", "rm", "ppo", "dpo", "grpo", "eval", "report")
UPSTREAM = {"data": [], "tokenizer": ["data"], "pretrain": ["tokenizer"], "sft": ["pretrain"], "pairs": ["sft"],
            "rm": ["pairs"], "ppo": ["rm", "sft"], "dpo": ["pairs"], "grpo": ["rm", "sft"],
            "eval": ["pretrain", "sft", "rm", "ppo", "dpo", "grpo"], "report": ["eval"]}
ALIASES = {"base": "pretrain", "comparisons": "pairs"}


def downstream(step: str) -> list[str]:
    """``step`` and every step that depends on it, in pipeline order."""
    out = {step}
    for s in STEPS:
        if any(u in out for u in UPSTREAM[s]):
            out.add(s)
    return [s for s in STEPS if s in out]
