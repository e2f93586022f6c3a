"""Model directories -> :class:`ServedModel` s: a causal LM gets a started :class:`Scheduler`, a reward model
(``*ForSequenceClassification``, e.g. a ``chatforge rm`` output) gets a :class:`RewardModelScorer`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from chatforge.serve.context import ServedModel


@dataclass
class SchedulerSettings:
    """Sizes of each chat model's scheduler (``chatforge serve --max-batch ...``)."""

    max_batch: int = 32
    """Most requests decoded together per model (the others wait their turn)."""
    cache_len: Optional[int] = None
    """KV-cache slots per request row (default: the context + a quarter)."""
    max_prefill_tokens: int = 4096
    """Most (padded) prompt tokens prefilled in one step."""


def split_spec(spec: str) -> tuple[Optional[str], str]:
    """'NAME=DIR' -> (NAME, DIR); 'DIR' -> (None, DIR)."""
    name, sep, path = spec.partition("=")
    if sep and name and "/" not in name and not Path(spec).exists():
        return name, path
    return None, spec


def model_names(specs: list[str]) -> list[tuple[str, str]]:
    """(name, dir) per spec: the given NAME, else the directory's own name; a clash is an error."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, path = split_spec(spec)
        out.append((name or Path(path).resolve().name, path))
    seen: dict[str, str] = {}
    for name, path in out:
        if name in seen:
            raise ValueError(f"two models would be called '{name}' ({seen[name]} and {path}); name them with "
                             f"--model NAME=DIR")
        seen[name] = path
    return out


def is_reward_dir(path: str | Path) -> bool:
    """True when config.json names a sequence-classification architecture (a reward model)."""
    from chatforge.model.hf import read_hf_config

    archs = read_hf_config(path).get("architectures") or []
    return any(str(a).endswith("ForSequenceClassification") for a in archs)


def load_served(name: str, path: str | Path, device: str = "cpu", settings: Optional[SchedulerSettings] = None,
                trust_remote_code: bool = False) -> ServedModel:
    """Load one model directory for serving (chat models' schedulers are started)."""
    from chatforge.model.load import load_causal_lm
    from chatforge.rl.reward import RewardError, RewardModelScorer
    from chatforge.scheduler import Scheduler

    settings = settings or SchedulerSettings()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"model directory '{path}' does not exist")
    if is_reward_dir(path):
        try:
            scorer, normalized = RewardModelScorer(path, device, trust_remote_code=trust_remote_code), True
        except RewardError:  # no stored statistics (a reward model trained elsewhere): raw scores only
            scorer, normalized = RewardModelScorer(path, device, normalize=False,
                                                   trust_remote_code=trust_remote_code), False
        return ServedModel(name=name, path=str(path), kind="reward", tokenizer=scorer.tokenizer,
                           context_length=scorer.block_size, model=scorer.model, scorer=scorer, normalized=normalized)
    model, cfg, tok = load_causal_lm(path, device, trust_remote_code=trust_remote_code)
    model = model.eval().requires_grad_(False)
    sched = Scheduler(model, max_batch=settings.max_batch, cache_len=settings.cache_len,
                      max_prefill_tokens=settings.max_prefill_tokens, pad_id=tok.pad_id, block_size=cfg.block_size)
    return ServedModel(name=name, path=str(path), kind="chat", tokenizer=tok, context_length=cfg.block_size,
                       model=model, scheduler=sched.start())


def load_all(specs: list[str], device: str = "cpu", settings: Optional[SchedulerSettings] = None,
             trust_remote_code: bool = False) -> dict[str, ServedModel]:
    """name -> ServedModel for every ``--model`` spec (DIR or NAME=DIR), in the given order."""
    if not specs:
        raise ValueError("no model to serve: give at least one --model DIR")
    return {name: load_served(name, path, device, settings, trust_remote_code) for name, path in model_names(specs)}
