"""LoRA fine-tuning through ``peft``, for any chatforge model (native GPT/ScalarModel or a wrapped HF model).

    model = apply_lora(model, cfg.lora)       # no-op when cfg.lora.r == 0
    ref = reference_from(model)               # the frozen reference of DPO / PPO / GRPO
    ...train...
    save_model_dir(model, out, mcfg, tok)     # merges the adapters when cfg.lora.merge (a plain HF directory)

``apply_lora`` injects LoRA layers in place (``peft.inject_adapter_in_model``): the module keeps its class
and interface, every base weight is frozen, and only the adapters train, plus

- a scalar model's ``score`` head (a new head must learn);
- the input/output embeddings when chat tokens were added to the tokenizer on load (their rows start
  at the mean embedding and must learn to differ).

``reference_from`` returns the policy itself with its adapters switched off (:class:`LoraReference`)
when every trainable parameter is a LoRA parameter (the base then equals the starting model, which is
the reference); otherwise a frozen deep copy of the model as it is now.

``lora.target_modules`` are module names (the last part of the dotted name: ``q_proj``) or
``all-linear`` (every linear layer but the output head and score head). Names that no module has are an
error listing the linear layers the model does have (GPT-2: ``c_attn``, ``c_proj``, ``c_fc``).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from chatforge.config import ConfigError, LoraConfig
from chatforge.distributed import unwrap
from chatforge.files import set_umask_mode
from chatforge.model.hf_causal import embeddings

HEAD_NAMES = ("lm_head", "score")  # never adapted by all-linear; 'score' stays fully trainable
ADAPTER_DIR = "adapter"  # <model dir>/adapter/: the unmerged adapter (lora.merge=false)


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"  # transformers' GPT-2 Conv1D


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every peft LoRA layer in ``model``."""
    if "peft" not in sys.modules:  # no peft layer exists before peft is imported (importing it costs seconds)
        return []
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in unwrap(model).named_modules() if isinstance(m, LoraLayer)]


def has_lora(model: nn.Module) -> bool:
    return bool(lora_layers(model))


def linear_module_names(model: nn.Module) -> list[str]:
    """Sorted distinct last-name parts of the linear layers of ``model`` (what target_modules can name)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if n and _is_linear(m)})


def resolve_targets(model: nn.Module, targets: list[str], source: str = "the model") -> list[str]:
    """Check lora.target_modules against the model; ``all-linear`` expands to every linear layer but the heads."""
    names = linear_module_names(model)
    if list(targets) == ["all-linear"]:
        return [n for n in names if n not in HEAD_NAMES]
    if not targets:
        raise ConfigError("lora.target_modules is empty; name the linear layers to adapt (or use all-linear)")
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(f"{source}: LoRA target modules {', '.join(missing)} do not exist in this model; its linear "
                          f"layers are: {', '.join(names)} (set --lora.target_modules=... or all-linear)")
    return list(targets)


def apply_lora(model: nn.Module, lcfg: LoraConfig, trainable: tuple[str, ...] = ("score",)) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze its base (see the module docstring).

    Returns ``model`` (unchanged when ``lcfg.r == 0``). Parameters whose dotted name contains one of
    ``trainable`` as a part stay trainable (the scalar head).
    """
    if lcfg.r <= 0:
        return model
    import peft

    if has_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    cfg = getattr(model, "cfg", None)
    targets = resolve_targets(model, lcfg.target_modules, getattr(cfg, "init", None) or type(model).__name__)
    conv1d = any(type(m).__name__ == "Conv1D" and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules())
    pcfg = peft.LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, target_modules=targets,
                           fan_in_fan_out=conv1d, bias="none")
    peft.inject_adapter_in_model(pcfg, model)  # base frozen, adapters trainable
    for name, p in model.named_parameters():
        if any(t in name.split(".") for t in trainable):
            p.requires_grad_(True)
    if getattr(model, "chat_tokens_added", None):
        for layer in embeddings(model):
            if layer is not None:
                layer.weight.requires_grad_(True)
    model.lora_config = lcfg
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model`` computes with its base weights only (adapters off)."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m in layers:
            m.enable_adapters(True)


def _replace_lora_layers(model: nn.Module, merge: bool) -> nn.Module:
    """Swap every LoRA layer for its base layer (after merging the adapter into it when ``merge``)."""
    for name, layer in lora_layers(model):
        if merge:
            layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "peft_config"):
        del model.peft_config
    model.__dict__.pop("lora_config", None)
    return model


def merged_copy(model: nn.Module) -> nn.Module:
    """A plain (adapter-free) deep copy of ``model`` with the adapters merged into the base weights."""
    return _replace_lora_layers(copy.deepcopy(unwrap(model)), merge=True)


def base_copy(model: nn.Module) -> nn.Module:
    """A plain deep copy of ``model``'s base weights (adapters dropped, not merged)."""
    return _replace_lora_layers(copy.deepcopy(unwrap(model)), merge=False)


def shares_base(model: nn.Module) -> bool:
    """True when the frozen base of ``model`` is exactly its starting model: LoRA is on and every trainable
    parameter is a LoRA parameter."""
    model = unwrap(model)
    if not has_lora(model):
        return False
    return all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


class LoraReference(nn.Module):
    """The reference model as a view of the policy with its adapters off: no weights of its own.

    ``ref(idx, attention_mask)`` -> logits of the base model, under ``torch.no_grad``. ``.to``, ``.eval``,
    ``.train`` and ``.requires_grad_`` do nothing (they would otherwise touch the policy);
    ``parameters()`` yields the policy's (for device/dtype look-ups).
    """

    def __init__(self, policy: nn.Module):
        super().__init__()
        object.__setattr__(self, "policy", unwrap(policy))  # not registered: no second copy in state_dict

    def forward(self, *args, **kwargs):
        with torch.no_grad(), adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)

    def parameters(self, recurse: bool = True):
        return self.policy.parameters(recurse)

    def requires_grad_(self, requires_grad: bool = True) -> "LoraReference":
        return self

    def train(self, mode: bool = True) -> "LoraReference":
        return self

    def to(self, *args, **kwargs) -> "LoraReference":
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "policy"), name)


def reference_from(policy: nn.Module) -> nn.Module:
    """The frozen reference model for DPO / PPO / GRPO, taken from the policy *before* training.

    LoRA policy whose base is the starting model (:func:`shares_base`): a :class:`LoraReference` (no extra
    memory). Otherwise a frozen deep copy in eval mode (adapter-free: LoRA merged, which equals the base
    before training).
    """
    if shares_base(policy):
        return LoraReference(policy)
    src = unwrap(policy)
    ref = merged_copy(src) if has_lora(src) else copy.deepcopy(src)
    ref.eval()
    ref.requires_grad_(False)
    return ref


# -------------------------------------------------------------------------- unmerged adapters on disk


def save_adapter(model: nn.Module, directory) -> None:
    """Write ``model``'s adapter (peft format: adapter_config.json + adapter_model.safetensors)."""
    import peft

    model = unwrap(model)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(model)
    prefix = "hf." if hasattr(model, "hf") else ""  # wrapped HF models: names as in the transformers model
    state = {"base_model.model." + k[len(prefix):] if k.startswith(prefix) else k: v.detach().cpu().contiguous()
             for k, v in state.items()}
    save_file(state, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    set_umask_mode(d / "adapter_model.safetensors")  # safetensors writes it 0600
    model.peft_config["default"].save_pretrained(str(d))


def load_adapter_merged(model: nn.Module, directory) -> nn.Module:
    """Apply an adapter saved by :func:`save_adapter` to ``model`` and merge it (returns a plain model)."""
    import peft

    d = Path(directory)
    pcfg = peft.LoraConfig.from_pretrained(str(d))
    pcfg.inference_mode = False
    peft.inject_adapter_in_model(pcfg, model)
    prefix = "hf." if hasattr(model, "hf") else ""
    saved = load_file(str(d / "adapter_model.safetensors"))
    state = {prefix + k[len("base_model.model."):]: v for k, v in saved.items()}
    res = peft.set_peft_model_state_dict(model, state)
    bad = [k for k in getattr(res, "unexpected_keys", []) if "lora_" in k]
    if bad:
        raise ValueError(f"{d}: adapter weights do not match the model: {', '.join(bad[:5])}")
    return _replace_lora_layers(model, merge=True)

