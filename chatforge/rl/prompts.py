"""RL prompts: read and render a prompt file (:func:`load_prompt_set`) and draw each step's prompts
(:class:`PromptLoader`, world-size invariant, its position saved in checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass

from chatforge.config import Config, ConfigError
from chatforge.data.batching import BucketBatcher
from chatforge.data.prompts import read_prompts
from chatforge.data.records import DataError
from chatforge.tokenizer import render_prompt


@dataclass
class PromptSet:
    ids: list[list[int]]
    """Rendered generation prompts (ending with <|assistant|>)."""
    texts: list[str]
    """The last user message of each prompt (what a reward function reads as the prompt)."""
    sources: list[str]
    """'file:line' of each prompt."""
    skipped_long: int
    """Prompts dropped because they leave fewer than max_new_tokens of context."""
    meta: dict


def last_user_text(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def load_prompt_set(cfg: Config, tok, block_size: int, log: bool = True) -> PromptSet:
    """Read and render cfg.data.path; prompts longer than block_size - rl.max_new_tokens are counted skips."""
    if not cfg.data.path:
        raise ConfigError("no prompts: set --data.path=PROMPTS.jsonl (JSON strings, {\"prompt\"} or {\"messages\"})")
    records = read_prompts(cfg.data.path, strict=cfg.data.strict)
    limit = block_size - cfg.rl.max_new_tokens
    if limit < 2:
        raise ConfigError(f"rl.max_new_tokens={cfg.rl.max_new_tokens} leaves no room for a prompt in the "
                          f"model's context of {block_size} tokens")
    ids, texts, sources, long = [], [], [], 0
    for p in records:
        r = render_prompt(tok, p.messages)
        if len(r) > limit:
            long += 1
            continue
        ids.append(r)
        texts.append(last_user_text(p.messages))
        sources.append(p.source)
        if cfg.data.max_examples and len(ids) >= cfg.data.max_examples:
            break
    files = ", ".join(map(str, cfg.data.path))
    if not ids:
        raise DataError(files, 0, f"no usable prompt: all {len(records)} are longer than {limit} tokens "
                                  f"(block_size {block_size} - rl.max_new_tokens {cfg.rl.max_new_tokens})")
    if log:
        skips = getattr(records, "skips", None)
        print(f"prompts: {len(ids)} from {files}; {long} skipped as longer than {limit} tokens"
              + (f"; bad records skipped: {skips}" if skips and len(skips) else ""))
    meta = {"files": [str(p) for p in cfg.data.path], "prompts": len(ids), "skipped_long": long}
    return PromptSet(ids, texts, sources, long, meta)


class PromptLoader:
    """Prompt indices per rollout: a shuffled global batch of ``per_rank * world_size`` prompts per step,
    sliced by rank (world-size invariant, like data/batching); its position is checkpoint state."""

    def __init__(self, n: int, per_rank: int, seed: int, rank: int = 0, world_size: int = 1):
        self.batcher = BucketBatcher([1] * n, per_rank, 1, seed=seed, rank=rank, world_size=world_size, bucket=False)

    def next(self) -> list[int]:
        return self.batcher.next()[0]

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.batcher.load_state_dict(s)
