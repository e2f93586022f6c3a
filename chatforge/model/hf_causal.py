"""Hugging Face models of other architectures (Qwen2, GPT-2, ...) behind chatforge's small interface.

The native :class:`~chatforge.model.gpt.GPT` is the fast path for Llama-shaped checkpoints; any other
causal LM that transformers can load runs through its own model class, wrapped here so that stages,
the engine and the trainer see the same interface:

    HFCausalLM(idx (B, T), attention_mask=None, cache=None) -> logits (B, T, V)
    HFCausalLM.make_cache(batch_size, max_len, device, dtype) -> HFCache   (the engine's KV cache)
    HFScalarModel(idx (B, T), attention_mask=None)             -> values (B, T) fp32 (reward model / critic)

Positions follow the native model: ``cumsum(mask) - 1`` (clamped at 0), so a left-padded row gives
the same outputs at its real tokens as the unpadded row, in a full forward and in cached decoding.

A scalar model is transformers' ``*ForSequenceClassification`` with ``num_labels=1`` (base model +
bias-free ``score`` head); its directory loads in ``AutoModelForSequenceClassification``. An
architecture without such a class cannot serve as a reward model (:class:`NoRewardHeadError`).

Dropout: every ``*dropout``/``*pdrop`` probability in the config is set to 0 on load (chatforge trains
without dropout after pretraining; RL needs deterministic log-probs), and the saved config keeps 0.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn

from chatforge.config import ModelConfig
from chatforge.files import set_umask_mode
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarModel
from chatforge.model.hf import ModelDirError, read_hf_config


class NoRewardHeadError(ModelDirError):
    """The architecture has no ``*ForSequenceClassification`` class: it cannot serve as a reward model."""


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch from a hub
    import transformers

    return transformers


def positions(mask: torch.Tensor, start: Union[torch.Tensor, int] = 0) -> torch.Tensor:
    """(B, T) mask, 1 = real -> (B, T) positions: real tokens numbered start, start+1, ... (pads clamp)."""
    return (start + mask.long().cumsum(1) - 1).clamp(min=0)


def zero_dropout(config) -> None:
    """Set every dropout probability of an HF config to 0 (in place)."""
    for k, v in list(config.to_dict().items()):
        if isinstance(v, float) and ("dropout" in k or "pdrop" in k) and hasattr(config, k):
            setattr(config, k, 0.0)


def model_config_from_any(config, init: Optional[str] = None, trust_remote_code: bool = False) -> ModelConfig:
    """A best-effort :class:`ModelConfig` describing an HF config (shapes for logs, resume checks and the
    engine's ``block_size``); the HF config stays the source of truth for the wrapped model."""
    n_embd = int(getattr(config, "hidden_size", 0) or 0)
    n_head = int(getattr(config, "num_attention_heads", 1) or 1)
    n_kv = getattr(config, "num_key_value_heads", None)
    block = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    return ModelConfig(
        init=init,
        n_layer=int(getattr(config, "num_hidden_layers", 1) or 1),
        n_head=n_head,
        n_kv_head=None if n_kv in (None, n_head) else int(n_kv),
        n_embd=n_embd,
        intermediate_size=getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None),
        block_size=int(block),
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        dropout=0.0,
        trust_remote_code=trust_remote_code,
    )


class HFCache:
    """The engine's KV cache for a wrapped model: transformers' ``DynamicCache`` plus the bookkeeping the
    native :class:`~chatforge.model.inference.KVCache` does (which slots are real tokens, the next position).

    valid: (B, S) 1 for real-token slots, 0 for padding; next_pos: (B,); length: slots filled.
    """

    def __init__(self, config, batch_size: int, max_len: int, device=None):
        self.kv = _transformers().DynamicCache(config=config)
        self.valid = torch.zeros(batch_size, 0, dtype=torch.long, device=device)  # (B, S)
        self.next_pos = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.length = 0
        self.max_len = max_len


def _call(hf, idx, attention_mask, cache: Optional[HFCache], **kw):
    """One transformers forward with chatforge's padding and position rules -> the model output."""
    mask = torch.ones_like(idx) if attention_mask is None else attention_mask.long()  # (B, T)
    if cache is None:
        if attention_mask is None:
            return hf(input_ids=idx, **kw)  # plain causal forward, positions 0..T-1
        return hf(input_ids=idx, attention_mask=mask, position_ids=positions(mask), **kw)
    if cache.length + idx.shape[1] > cache.max_len:
        raise ValueError(f"KV cache full: {cache.length} + {idx.shape[1]} tokens > max_len={cache.max_len}")
    full = torch.cat([cache.valid, mask], dim=1)  # (B, S + T): every slot seen so far
    out = hf(input_ids=idx, attention_mask=full, position_ids=positions(mask, cache.next_pos[:, None]),
             cache=cache.kv, use_cache=True, **kw)
    cache.valid = full
    cache.next_pos = cache.next_pos + mask.sum(1)
    cache.length += idx.shape[1]
    return out


class _HFWrapper(nn.Module):
    """A transformers model ``hf`` with its chatforge ModelConfig, vocabulary size and trunk."""

    def __init__(self, hf: nn.Module, cfg: Optional[ModelConfig] = None):
        super().__init__()
        self.hf = hf
        self.cfg = cfg or model_config_from_any(hf.config)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_input_embeddings().weight.shape[0]

    @property
    def model(self) -> nn.Module:
        """The trunk (transformers' base model: ``model`` for Llama/Qwen2, ``transformer`` for GPT-2)."""
        return self.hf.base_model


class HFCausalLM(_HFWrapper):
    """A transformers causal LM with chatforge's interface (see the module docstring)."""

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[HFCache] = None, last_only: bool = False) -> torch.Tensor:
        """idx (B, T); attention_mask (B, T) 1 = real -> logits (B, T, V) (``last_only``: (B, 1, V))."""
        if cache is None and idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds the context length {self.cfg.block_size} "
                             f"of {self.cfg.init or 'the model'}")
        logits = _call(self.hf, idx, attention_mask, cache).logits  # (B, T, V)
        return logits[:, -1:] if last_only else logits

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype = torch.float32) -> HFCache:
        """An empty cache for the engine (transformers allocates keys/values as they come, in their dtype)."""
        return HFCache(self.hf.config, batch_size, max_len, device)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.hf.get_input_embeddings().weight.numel()
            out = self.hf.get_output_embeddings()
            if out is not None and out.weight is self.hf.get_input_embeddings().weight:
                n += out.weight.numel()  # a tied head is still a matmul
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token, as :meth:`GPT.flops_per_token` (6 N + 12 L d T)."""
        T = seq_len or self.cfg.block_size
        return 6 * self.num_params(exclude_embeddings=True) + 12 * self.cfg.n_layer * self.cfg.n_embd * T


class HFScalarModel(_HFWrapper):
    """transformers ``*ForSequenceClassification`` (num_labels=1): ids (B, T) -> per-token scalars (B, T) fp32.

    The score head is applied at every position (the PPO critic needs per-token values); a sequence's
    reward is the value at its rightmost real token (:func:`~chatforge.model.heads.gather_last`), which is
    what transformers' own forward returns.
    """

    def __init__(self, hf: nn.Module, cfg: Optional[ModelConfig] = None):
        if not isinstance(getattr(hf, "score", None), nn.Linear):
            raise NoRewardHeadError(f"{type(hf).__name__} has no linear 'score' head: architecture cannot serve "
                                    "as a reward model")
        super().__init__(hf, cfg)

    @property
    def score(self) -> nn.Linear:
        return self.hf.score

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx (B, T), attention_mask (B, T) 1 = real -> values (B, T) in fp32."""
        h = _call(self.hf.base_model, idx, attention_mask, None).last_hidden_state  # (B, T, C)
        return self.hf.score(h).squeeze(-1).float()  # (B, T)

    def init_score(self, std: Optional[float] = None) -> None:
        """Score head ~ N(0, std); None = 1/sqrt(d+1) (reward model), 0 = zeros (PPO critic)."""
        w = self.hf.score.weight
        if std is None:
            std = 1.0 / math.sqrt(w.shape[1] + 1)
        with torch.no_grad():
            if std == 0:
                w.zero_()
            else:
                w.normal_(0.0, std)
            if self.hf.score.bias is not None:
                self.hf.score.bias.zero_()

    @classmethod
    def from_causal(cls, policy: HFCausalLM, score_std: Optional[float] = None) -> "HFScalarModel":
        """A new scalar model whose trunk is a copy of ``policy``'s (same device and dtype)."""
        T = _transformers()
        config = policy.hf.config.__class__.from_dict(policy.hf.config.to_dict())
        config.num_labels = 1
        config.id2label, config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}
        config.problem_type = "regression"
        if config.pad_token_id is None:
            raise ModelDirError(f"{policy.cfg.init or 'the model'}: config has no pad_token_id; a reward model needs "
                                "one (transformers reads the score at the last non-pad token)")
        try:
            seq = T.AutoModelForSequenceClassification.from_config(
                config, trust_remote_code=policy.cfg.trust_remote_code)
        except ValueError as e:
            raise NoRewardHeadError(f"{policy.cfg.init or type(policy.hf).__name__}: architecture "
                                    f"{type(policy.hf).__name__} cannot serve as a reward model (transformers has "
                                    f"no sequence-classification class for model_type "
                                    f"{config.model_type!r}): {str(e).splitlines()[0]}") from None
        ref = next(policy.parameters())
        seq = seq.to(device=ref.device, dtype=ref.dtype)
        seq.base_model.load_state_dict(policy.hf.base_model.state_dict())
        m = cls(seq, policy.cfg)
        m.init_score(score_std)
        return m


# ------------------------------------------------------------------------------------------ loading


def _prepare_config(path: Path, trust_remote_code: bool):
    T = _transformers()
    try:
        config = T.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:  # ValueError (unknown model_type), OSError, remote-code refusal
        raise ModelDirError(f"{path}: transformers cannot read config.json: {str(e).splitlines()[0]}") from None
    zero_dropout(config)
    return config


def load_hf_causal(path: Union[str, Path], trust_remote_code: bool = False) -> HFCausalLM:
    """Any local causal-LM directory transformers can load -> HFCausalLM (fp32, eval mode, CPU)."""
    path = Path(path)
    read_hf_config(path)  # clear errors for a missing directory / config.json / bad JSON
    T = _transformers()
    config = _prepare_config(path, trust_remote_code)
    try:
        hf = T.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32,
                                                    trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise ModelDirError(f"{path}: not a causal language model transformers can load "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return HFCausalLM(hf.eval(), model_config_from_any(hf.config, str(path), trust_remote_code))


def load_hf_scalar(path: Union[str, Path], trust_remote_code: bool = False) -> HFScalarModel:
    """A local ``*ForSequenceClassification`` directory with num_labels=1 -> HFScalarModel."""
    path = Path(path)
    raw = read_hf_config(path)
    arch = (raw.get("architectures") or ["?"])[0]
    if not arch.endswith("ForSequenceClassification"):
        raise ModelDirError(f"{path}: holds a {arch}, not a reward model (expected a *ForSequenceClassification "
                            "with num_labels 1, e.g. the rm/ output of `chatforge rm`)")
    T = _transformers()
    config = _prepare_config(path, trust_remote_code)
    if config.num_labels != 1:
        raise ModelDirError(f"{path}/config.json: sequence classifier with num_labels={config.num_labels}; "
                            "a reward model has one output")
    try:
        hf = T.AutoModelForSequenceClassification.from_pretrained(
            path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise ModelDirError(f"{path}: transformers cannot load the reward model "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return HFScalarModel(hf.eval(), model_config_from_any(hf.config, str(path), trust_remote_code))


# ------------------------------------------------------------------------------------------ saving


def save_hf_model(model: Union[HFCausalLM, HFScalarModel], out_dir: Union[str, Path], special_ids: dict,
                  generation: Optional[dict] = None) -> Path:
    """Write a wrapped model with transformers' ``save_pretrained`` (config.json, model.safetensors in fp32,
    generation_config.json for a causal LM), recording chatforge's pad / bos / eos ids as
    :func:`chatforge.model.hf.save_model` does. Other files in ``out_dir`` are left alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = model.hf
    pad_id, bos_id, eot_id, end_id = (special_ids.get(k) for k in ("pad_id", "bos_id", "eos_id", "end_id"))
    eos = [i for i in (end_id, eot_id) if i is not None]
    eos = eos[0] if len(eos) == 1 else (eos or None)
    c = hf.config
    c.pad_token_id, c.bos_token_id, c.eos_token_id = pad_id, bos_id, eos
    if isinstance(model, HFCausalLM) and getattr(hf, "generation_config", None) is not None:
        gc = hf.generation_config
        gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = pad_id, bos_id, eos
        for k, v in (generation or {}).items():
            setattr(gc, k, v)
    if any(p.dtype != torch.float32 for p in hf.parameters()):
        raise ValueError("save_hf_model: weights must be fp32 (chatforge saves fp32 model directories)")
    hf.save_pretrained(out, safe_serialization=True)
    for f in out.glob("*.safetensors"):  # safetensors writes them 0600; give them the umask's mode
        set_umask_mode(f)
    return out


def embeddings(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """(input embedding, untied output projection or None) of a native or wrapped transformers model."""
    if isinstance(model, (HFCausalLM, HFScalarModel)):
        inp, out = model.hf.get_input_embeddings(), model.hf.get_output_embeddings()
    else:
        inp, out = model.model.embed_tokens, getattr(model, "lm_head", None)
    if out is not None and out.weight is inp.weight:
        out = None
    return inp, out


def new_like(model: nn.Module) -> nn.Module:
    """A new, unsharded model of the same class and shapes as ``model`` (native or wrapped transformers), without
    LoRA adapters (model/load.fresh_like adds the same adapter layout)."""
    if isinstance(model, (GPT, ScalarModel)):  # native: no transformers import (seconds of start-up)
        return type(model)(model.cfg, model.vocab_size)
    T = _transformers()
    if isinstance(model, HFCausalLM):
        return HFCausalLM(T.AutoModelForCausalLM.from_config(
            model.hf.config, dtype=torch.float32, trust_remote_code=model.cfg.trust_remote_code), model.cfg)
    if isinstance(model, HFScalarModel):
        return HFScalarModel(T.AutoModelForSequenceClassification.from_config(
            model.hf.config, dtype=torch.float32, trust_remote_code=model.cfg.trust_remote_code), model.cfg)
    raise TypeError(f"fresh_like: unsupported model {type(model).__name__}")
