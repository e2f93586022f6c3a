"""Write a trained model as a complete Hugging Face model directory (weights, config, generation config,
tokenizer, and an unmerged LoRA adapter when asked), whatever its class: native GPT / ScalarModel, a wrapped
transformers model, with or without LoRA adapters. The run's own records (chatforge.json) are chatforge.rundir's.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch.nn as nn

from chatforge import distributed as D
from chatforge.config import ModelConfig
from chatforge.model import lora as L
from chatforge.model.hf import save_model
from chatforge.model.hf_causal import HFCausalLM, HFScalarModel, save_hf_model
from chatforge.tokenizer import ChatTokenizer


def special_ids(tok: ChatTokenizer) -> dict:
    """The ids a Hugging Face model directory records (see model/hf.save_model)."""
    return {"pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eot_id, "end_id": tok.end_id}


def save_model_dir(model: nn.Module, out: Path, model_cfg: ModelConfig, tok: ChatTokenizer,
                   generation: Optional[dict] = None) -> None:
    """Write a complete Hugging Face model directory: weights, config, generation config, tokenizer.

    ``model``: the trained model (a DDP/compile wrapper is stripped): native GPT / ScalarModel
    (model/hf.save_model) or a wrapped transformers model (save_pretrained). With LoRA adapters
    (model/lora.apply_lora) the adapters are merged into the weights when ``lora.merge`` (a plain HF
    directory); otherwise the base weights are written and the adapter goes to ``<out>/adapter/``
    (peft format; load_causal_lm merges it back on load). Under FSDP, pass an unsharded copy (as
    stages/common.finish does).
    """
    out = Path(out)
    model = D.unwrap(model)
    adapter = None
    if L.has_lora(model):
        if model.lora_config.merge:
            model = L.merged_copy(model)
        else:
            adapter, model = model, L.base_copy(model)
    if isinstance(model, (HFCausalLM, HFScalarModel)):
        save_hf_model(model, out, special_ids(tok), generation)
    else:
        save_model(model, out, model_cfg, model.vocab_size, special_ids(tok), generation)
    tok.save(out, model_max_length=model_cfg.block_size)
    if adapter is not None:
        L.save_adapter(adapter, out / L.ADAPTER_DIR)
    elif (out / L.ADAPTER_DIR).is_dir():  # a stale adapter from an earlier unmerged save
        shutil.rmtree(out / L.ADAPTER_DIR)
