"""Load a stage's starting model and tokenizer from a model directory.

Every stage enters through these functions, so that any model a directory can hold (the
native GPT, a reward model, or a Hugging Face model through its wrapper) reaches the
stage behind the same small interface: ``model(idx, attention_mask=None, cache=None)``
returns logits (B, T, V), ``model.make_cache(...)`` serves the engine, ``model.model`` is
the trunk that a scalar head can sit on.

Which class runs a directory:

    Llama-shaped checkpoint (chatforge's own, or HF Llama without biases...)  -> native GPT / ScalarModel
    any other causal LM transformers loads (Qwen2, GPT-2, ...)                 -> HFCausalLM (hf_causal.py)
    any other *ForSequenceClassification with num_labels=1                     -> HFScalarModel

The tokenizer comes from the same directory; chat tokens it lacks are added
(:mod:`chatforge.model.hf_tokenizer`) and the embedding rows of the new ids are set to the mean of
the existing token embeddings (:func:`fit_vocab`). Nothing is downloaded (HF_HUB_OFFLINE=1);
``trust_remote_code`` is passed through to transformers and is off unless asked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from chatforge.config import ModelConfig
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarModel
from chatforge.model.hf import ModelDirError, NotNativeModelError, load_model, read_hf_config
from chatforge.model.hf_causal import HFCausalLM, HFScalarModel, embeddings, load_hf_causal, load_hf_scalar, new_like
from chatforge.model.hf_tokenizer import load_chat_tokenizer
from chatforge.model.lora import ADAPTER_DIR, apply_lora, has_lora, load_adapter_merged, merged_copy
from chatforge.tokenizer import ChatTokenizer


def load_tokenizer(path: str | Path, trust_remote_code: bool = False) -> ChatTokenizer:
    """The ChatTokenizer of a tokenizer or model directory (chat tokens added when missing)."""
    p = Path(path)
    if p.is_file():
        return ChatTokenizer.load(p)
    return load_chat_tokenizer(p, trust_remote_code)[0]


def fit_vocab(model: nn.Module, tok: ChatTokenizer, new_ids: list[int]) -> nn.Module:
    """Grow ``model``'s embedding (and untied output) rows to ``tok.vocab_size`` if needed, and set the rows of
    ``new_ids`` (tokens added to the tokenizer) to the mean of the rows of the original vocabulary."""
    V = tok.vocab_size
    if V > model.vocab_size:
        if isinstance(model, (HFCausalLM, HFScalarModel)):
            model.hf.resize_token_embeddings(V, mean_resizing=False)
        else:  # native GPT / ScalarModel: grow in place, keeping the tie
            old = model.model.embed_tokens
            emb = nn.Embedding(V, old.embedding_dim).to(old.weight)
            with torch.no_grad():
                emb.weight[: old.num_embeddings] = old.weight
            model.model.embed_tokens = emb
            if isinstance(model, GPT):
                if model.cfg.tie_embeddings:
                    model.lm_head = nn.Linear(old.embedding_dim, V, bias=False).to(old.weight)
                    model.lm_head.weight = emb.weight
                else:
                    head = nn.Linear(old.embedding_dim, V, bias=False).to(old.weight)
                    with torch.no_grad():
                        head.weight[: old.num_embeddings] = model.lm_head.weight
                    model.lm_head = head
            model.vocab_size = V
    if new_ids:
        n_old = min(min(new_ids), model.vocab_size)  # the rows of the original tokenizer's ids
        with torch.no_grad():
            for layer in embeddings(model):
                if layer is not None:
                    w = layer.weight  # (V, C)
                    w[new_ids] = w[:n_old].mean(dim=0, keepdim=True)
    model.chat_tokens_added = list(new_ids)  # LoRA keeps these rows trainable (lora.apply_lora)
    return model


def _sync_special_ids(model: nn.Module, tok: ChatTokenizer) -> None:
    """Record the chat ids in a wrapped model's HF config (pad for the reward head, eos for generate)."""
    if isinstance(model, (HFCausalLM, HFScalarModel)):
        c = model.hf.config
        c.pad_token_id, c.bos_token_id, c.eos_token_id = tok.pad_id, tok.bos_id, [tok.end_id, tok.eot_id]
        gc = getattr(model.hf, "generation_config", None)
        if gc is not None:
            gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_id, tok.bos_id, [tok.end_id, tok.eot_id]


def _check_model_dir(path: Path) -> str:
    """read config.json (clear errors) -> its architecture name."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf = read_hf_config(path)
    return (hf.get("architectures") or ["?"])[0] or "?"


def load_causal_lm(path: str | Path, device: torch.device | str = "cpu", *,
                   trust_remote_code: bool = False) -> tuple[nn.Module, ModelConfig, ChatTokenizer]:
    """(causal LM on ``device``, its ModelConfig, its tokenizer) from a model directory.

    A native-architecture checkpoint loads as :class:`GPT`; any other causal LM transformers can load
    runs as :class:`HFCausalLM`. Both are fp32 and in eval mode.
    """
    path = Path(path)
    arch = _check_model_dir(path)
    try:
        model, cfg = load_model(path)
        if not isinstance(model, GPT):
            raise ModelDirError(f"{path}: holds a reward model, not a language model "
                                f"(a reward model directory cannot start this stage)")
    except NotNativeModelError:
        if arch.endswith("ForSequenceClassification"):
            raise ModelDirError(f"{path}: holds a {arch} (a reward model), not a language model "
                                f"(a reward model directory cannot start this stage)") from None
        model = load_hf_causal(path, trust_remote_code)
        cfg = model.cfg
    return _finish(model, cfg, path, device, trust_remote_code)


def _finish(model: nn.Module, cfg: ModelConfig, path: Path, device, trust_remote_code: bool):
    """What every loader does last: the chat tokenizer (chat tokens added if missing, embeddings grown to
    fit), the model's special ids, a saved LoRA adapter merged back, and the move to ``device``."""
    cfg.trust_remote_code = trust_remote_code
    tok, added = load_chat_tokenizer(path, trust_remote_code)
    fit_vocab(model, tok, added)
    _sync_special_ids(model, tok)
    model = _merge_saved_adapter(model, path)
    return model.to(device), cfg, tok


def _merge_saved_adapter(model: nn.Module, path: Path) -> nn.Module:
    """A directory saved with lora.merge=false holds the base weights and ``adapter/``: merge it back."""
    if (path / ADAPTER_DIR / "adapter_config.json").is_file():
        model = load_adapter_merged(model, path / ADAPTER_DIR)
        model.eval()
    return model


def load_scalar_model(path: str | Path, device: torch.device | str = "cpu", *,
                      trust_remote_code: bool = False) -> tuple[nn.Module, ModelConfig, ChatTokenizer]:
    """(reward/value model on ``device``, its ModelConfig, its tokenizer) from an rm/ directory:
    a native :class:`ScalarModel`, or an :class:`HFScalarModel` for other architectures."""
    path = Path(path)
    _check_model_dir(path)
    try:
        model, cfg = load_model(path)
        if not isinstance(model, ScalarModel):
            raise ModelDirError(f"{path}: holds a language model, not a reward model "
                                f"(expected LlamaForSequenceClassification with num_labels 1, as `chatforge rm` writes)")
    except NotNativeModelError:
        model = load_hf_scalar(path, trust_remote_code)
        cfg = model.cfg
    return _finish(model, cfg, path, device, trust_remote_code)


def scalar_from_causal(policy: nn.Module, score_std: Optional[float] = None) -> nn.Module:
    """A scalar-head model on a copy of a causal LM's trunk (RM init from SFT; critic without an RM).

    A policy with LoRA adapters gives its merged weights (the scalar model has no adapters; give it its
    own with ``apply_lora``)."""
    if has_lora(policy):
        added = getattr(policy, "chat_tokens_added", [])
        policy = merged_copy(policy)
        policy.chat_tokens_added = added
    if isinstance(policy, GPT):
        m = ScalarModel.from_trunk(policy, score_std=score_std)
    elif isinstance(policy, HFCausalLM):
        m = HFScalarModel.from_causal(policy, score_std=score_std)
    else:
        raise TypeError(f"cannot put a scalar head on a {type(policy).__name__}")
    m.chat_tokens_added = list(getattr(policy, "chat_tokens_added", []))
    return m


def fresh_like(model: nn.Module) -> nn.Module:
    """A new, unsharded model of the same class and shapes as ``model`` (to load a full state dict into),
    with the same LoRA adapter layout when ``model`` has adapters (so its state dict loads as is)."""
    fresh = new_like(model)
    if has_lora(model):
        apply_lora(fresh, model.lora_config)
    return fresh
