"""Hugging Face model directories for the native model: write and read them.

A directory written by :func:`save_model` loads in transformers as ``LlamaForCausalLM``
(a :class:`~chatforge.model.gpt.GPT`) or ``LlamaForSequenceClassification`` with
``num_labels=1`` (a :class:`~chatforge.model.heads.ScalarModel`):

    config.json               the Llama config (:func:`llama_config`)
    model.safetensors         fp32 weights under HF names; no ``lm_head.weight`` when tied
                              (transformers ties it back to ``model.embed_tokens.weight``)
    generation_config.json    bos / eos (end-of-turn and end-of-text) / pad ids

Each file is written to a temporary name in the directory and moved into place with
``os.replace`` (atomic), so other files there (metrics.jsonl, checkpoint/, tokenizer files)
are left alone and a reader never sees a half-written file. config.json is written last.

:func:`load_model` reads such a directory back, and any Hugging Face Llama directory that the
native model can run exactly. Other architectures raise :class:`NotNativeModelError`: those
go through the transformers-wrapper path instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from chatforge.config import ModelConfig
from chatforge.errors import ChatforgeError
from chatforge.files import set_umask_mode
from chatforge.model.gpt import GPT, kv_heads, mlp_hidden_size
from chatforge.model.heads import ScalarModel

CAUSAL_ARCH = "LlamaForCausalLM"
REWARD_ARCH = "LlamaForSequenceClassification"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class ModelDirError(ChatforgeError, ValueError):
    """The path is not a usable model directory (missing config.json or weights, bad JSON, bad shapes)."""


class NotNativeModelError(ModelDirError):
    """A valid Hugging Face model directory that the native model cannot run exactly
    (another architecture, biases, another RoPE type...): load it through the transformers-wrapper path."""


def llama_config(cfg: ModelConfig, vocab_size: int, *, pad_id: Optional[int], bos_id: Optional[int],
                 eos_id: Union[int, list[int], None], kind: str = "causal") -> dict:
    """config.json content for the native model. ``kind`` = 'causal' (LlamaForCausalLM) or
    'reward' (LlamaForSequenceClassification, num_labels=1; needs ``pad_id`` so that transformers
    can find each row's last real token)."""
    if kind not in ("causal", "reward"):
        raise ValueError(f"kind must be 'causal' or 'reward', got {kind!r}")
    if kind == "reward" and pad_id is None:
        raise ValueError("a reward model config needs pad_id (transformers reads the score at the last non-pad token)")
    d = {
        "architectures": [CAUSAL_ARCH if kind == "causal" else REWARD_ARCH],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": mlp_hidden_size(cfg),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": kv_heads(cfg),
        "head_dim": cfg.n_embd // cfg.n_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # transformers < 5 reads this key
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},  # transformers >= 5
        "attention_bias": False,
        "attention_dropout": cfg.dropout,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "pad_token_id": pad_id,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if kind == "reward":
        d["num_labels"] = 1
        d["id2label"] = {"0": "LABEL_0"}
        d["label2id"] = {"LABEL_0": 0}
    return d


def model_config_from_hf(d: dict, source: str = "config.json") -> ModelConfig:
    """A ModelConfig from an HF Llama config dict. Raises :class:`NotNativeModelError` for anything
    the native model does not compute exactly (``source`` names the file in the message)."""
    arch = (d.get("architectures") or [None])[0]
    problems = []
    if d.get("model_type") != "llama":
        problems.append(f"model_type={d.get('model_type')!r} (native needs 'llama')")
    if arch not in (CAUSAL_ARCH, REWARD_ARCH):
        problems.append(f"architecture {arch!r} (native supports {CAUSAL_ARCH}, {REWARD_ARCH})")
    if d.get("attention_bias") or d.get("mlp_bias"):
        problems.append("attention/mlp biases")
    if d.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={d.get('hidden_act')!r}")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope_type={rope.get('rope_type', rope.get('type'))!r}")
    if problems:
        raise NotNativeModelError(f"{source}: not runnable by the native model: {'; '.join(problems)}. "
                                  "Load it through the Hugging Face (transformers) wrapper path instead.")
    try:
        n_embd, n_head = int(d["hidden_size"]), int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or n_embd // n_head
        if head_dim * n_head != n_embd:
            raise NotNativeModelError(f"{source}: head_dim={head_dim} * num_attention_heads={n_head} != hidden_size="
                                      f"{n_embd}; load it through the Hugging Face (transformers) wrapper path instead.")
        n_kv = int(d.get("num_key_value_heads") or n_head)
        cfg = ModelConfig(
            n_layer=int(d["num_hidden_layers"]),
            n_head=n_head,
            n_kv_head=None if n_kv == n_head else n_kv,
            n_embd=n_embd,
            intermediate_size=int(d["intermediate_size"]),
            block_size=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            dropout=float(d.get("attention_dropout", 0.0)),
        )
    except KeyError as e:
        raise ModelDirError(f"{source}: missing key {e} in the Llama config") from None
    if cfg.intermediate_size == mlp_hidden_size(ModelConfig(n_embd=cfg.n_embd)):
        cfg.intermediate_size = None  # the default rule gives the same size
    return cfg


def _atomic_write(path: Path, write) -> None:
    """Write ``path`` via a temporary sibling file and os.replace (atomic on POSIX), with the umask's mode
    (safetensors creates its files 0600)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        set_umask_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def save_model(model: nn.Module, out_dir: Union[str, Path], cfg: ModelConfig, vocab_size: int,
               special_ids: dict, generation: Optional[dict] = None) -> Path:
    """Write ``model`` (a GPT or ScalarModel) as a Hugging Face model directory; returns the path.

    special_ids: ``{"pad_id": int, "bos_id": int, "eos_id": int (<|endoftext|>),
    "end_id": int | None (<|end|>, end of turn)}``. generation_config.json gets
    eos_token_id = [end_id, eos_id] (generation stops at either), pad and bos ids, plus any
    extra fields in ``generation`` (e.g. ``{"do_sample": True, "temperature": 0.8}``).
    """
    model = _unwrap(model)
    if isinstance(model, ScalarModel):
        kind = "reward"
    elif isinstance(model, GPT):
        kind = "causal"
    else:
        raise TypeError(f"save_model: expected a GPT or ScalarModel, got {type(model).__name__}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pad_id, bos_id, eos_id = special_ids.get("pad_id"), special_ids.get("bos_id"), special_ids.get("eos_id")
    end_id = special_ids.get("end_id")
    eos_ids = [i for i in (end_id, eos_id) if i is not None]
    eos_field = eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)

    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied: transformers ties lm_head back to model.embed_tokens.weight
        tensors[name] = t.detach().to(device="cpu", dtype=torch.float32).contiguous().clone()
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))

    if kind == "causal":
        gen = {"bos_token_id": bos_id, "eos_token_id": eos_field, "pad_token_id": pad_id}
        gen.update(generation or {})
        _write_json(out / "generation_config.json", gen)
    _write_json(out / "config.json", llama_config(cfg, vocab_size, pad_id=pad_id, bos_id=bos_id,
                                                  eos_id=eos_field, kind=kind))
    return out


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    single, index = d / WEIGHTS_NAME, d / WEIGHTS_INDEX_NAME
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        out: dict[str, torch.Tensor] = {}
        for s in shards:
            out.update(load_file(str(d / s)))
        return out
    raise ModelDirError(f"{d}: no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) found; not a model directory "
                        "with safetensors weights")


def read_hf_config(model_dir: Union[str, Path]) -> dict:
    """The parsed config.json of a model directory, with clear errors."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelDirError(f"{d}: model directory does not exist")
    path = d / "config.json"
    if not path.is_file():
        raise ModelDirError(f"{d}: not a model directory (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelDirError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None


def load_model(model_dir: Union[str, Path]) -> tuple[nn.Module, ModelConfig]:
    """Read a native model directory -> (GPT or ScalarModel in eval mode on CPU, fp32; its ModelConfig).

    ``cfg.init`` is set to the directory. Raises :class:`ModelDirError` when the directory has no
    config.json or weights, and :class:`NotNativeModelError` for architectures that need the
    transformers-wrapper path.
    """
    d = Path(model_dir)
    hf = read_hf_config(d)
    cfg = model_config_from_hf(hf, source=str(d / "config.json"))
    cfg.init = str(d)
    arch = hf["architectures"][0]
    if arch == REWARD_ARCH and int(hf.get("num_labels", len(hf.get("id2label") or {0: 0}))) != 1:
        raise NotNativeModelError(f"{d / 'config.json'}: sequence classifier with num_labels != 1; "
                                  "the native ScalarModel has one output")
    vocab_size = int(hf["vocab_size"])
    model = GPT(cfg, vocab_size) if arch == CAUSAL_ARCH else ScalarModel(cfg, vocab_size)
    state = _read_weights(d)
    if isinstance(model, GPT) and cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # some writers store the tied copy too
        if "model.embed_tokens.weight" in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelDirError(f"{d}: weights do not match config.json: {e}") from None
    return model.float().eval(), cfg
