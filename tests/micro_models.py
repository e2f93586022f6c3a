"""Micro chatforge model directories made in a second, for tests that need a model but not a trained one."""

from __future__ import annotations

from pathlib import Path

import torch

from chatforge.config import load_config
from chatforge.model.gpt import GPT
from chatforge.stages.common import save_model_dir
from chatforge.tokenizer import train_tokenizer
from tests.conftest import ROOT

MICRO = ROOT / "configs" / "micro.yaml"
TEXTS = ["the film is a charming and often affecting journey .", "it is a bad movie , dull and slow .",
         "a great story told with wit and warmth .", "the plot is thin and the jokes fall flat ."]


def make_model_dir(out: Path, seed: int, std: float = 0.3) -> Path:
    """A micro model directory: a BPE tokenizer trained on TEXTS (the same for every seed) and a GPT with random
    weights of std ``std`` (larger than the training init: peaked distributions tell models apart)."""
    tok = train_tokenizer(TEXTS * 10, 300)
    cfg = load_config("pretrain", MICRO, [])
    torch.manual_seed(seed)
    model = GPT(cfg.model, tok.vocab_size)
    model.init_weights(std=std)
    save_model_dir(model, out, cfg.model, tok)
    return out
