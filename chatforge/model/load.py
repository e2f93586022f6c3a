"""Load a stage's starting model and tokenizer from a model directory.

Every stage enters through these functions, so that any model a directory can hold (the
native GPT, a reward model, or a Hugging Face model through its wrapper) reaches the
stage behind the same small interface: ``model(idx, attention_mask=None, cache=None)``
returns logits (B, T, V), ``model.make_cache(...)`` serves the engine, ``model.model`` is
the trunk that a scalar head can sit on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from chatforge.config import ModelConfig
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarModel
from chatforge.model.hf import ModelDirError, load_model
from chatforge.tokenizer import ChatTokenizer


def load_tokenizer(path: str | Path) -> ChatTokenizer:
    return ChatTokenizer.load(path)


def load_causal_lm(path: str | Path, device: torch.device | str = "cpu", *,
                   trust_remote_code: bool = False) -> tuple[torch.nn.Module, ModelConfig, ChatTokenizer]:
    """(causal LM on ``device``, its ModelConfig, its tokenizer) from a model directory."""
    model, cfg = load_model(path)
    if not isinstance(model, GPT):
        raise ModelDirError(f"{path}: holds a {type(model).__name__}, not a causal language model "
                            f"(a reward model directory cannot start this stage)")
    return model.to(device), cfg, load_tokenizer(path)


def load_scalar_model(path: str | Path, device: torch.device | str = "cpu", *,
                      trust_remote_code: bool = False) -> tuple[ScalarModel, ModelConfig, ChatTokenizer]:
    """(reward/value model on ``device``, its ModelConfig, its tokenizer) from an rm/ directory."""
    model, cfg = load_model(path)
    if not isinstance(model, ScalarModel):
        raise ModelDirError(f"{path}: holds a {type(model).__name__}, not a reward model "
                            f"(expected LlamaForSequenceClassification with num_labels 1)")
    return model.to(device), cfg, load_tokenizer(path)


def scalar_from_causal(policy: torch.nn.Module, score_std: Optional[float] = None) -> ScalarModel:
    """A scalar-head model on a copy of a causal LM's trunk (RM init from SFT; critic without an RM)."""
    if isinstance(policy, GPT):
        return ScalarModel.from_trunk(policy, score_std=score_std)
    raise TypeError(f"cannot put a scalar head on a {type(policy).__name__}")
