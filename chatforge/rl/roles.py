"""The roles of an RL run and their memory: the trainable actor, the frozen reference, the reward.

Memory plan (all roles on one device):
  actor      trainable: weights + grads + AdamW state (4x its weights)
  critic     trainable (PPO only, built by the ppo stage): the same again, on the RM's or the policy's trunk
  reference  frozen copy of the SFT policy: weights only, eval(), requires_grad False, inference mode
             (PPO always; GRPO/RLOO only when rl.grpo_kl_coef > 0)
  reward     frozen RM (weights only) or a Python function (no memory)
Frozen roles can live on the CPU between their forwards (``rl.offload_frozen``), which leaves the
accelerator to the trainable roles during generation and updates. Every role's bytes are printed at start.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from chatforge.config import Config, ConfigError, ModelConfig
from chatforge.model.load import load_causal_lm
from chatforge.model.lora import apply_lora, reference_from
from chatforge.rl.reward import load_reward
from chatforge.tokenizer import ChatTokenizer


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere (RL log-prob ratios must not be noisy)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    if hasattr(model, "cfg") and hasattr(model.cfg, "dropout"):
        model.cfg.dropout = 0.0
    return model


def freeze(model: nn.Module) -> nn.Module:
    """A frozen role: eval mode, no gradients, dropout off."""
    disable_dropout(model).eval()
    model.requires_grad_(False)
    return model


def module_bytes(model: Optional[nn.Module]) -> int:
    """Bytes of a module's parameters and buffers (each shared tensor once)."""
    if model is None:
        return 0
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def reward_module(reward) -> Optional[nn.Module]:
    """The nn.Module behind a reward object (None for a Python function)."""
    if isinstance(reward, nn.Module):
        return reward
    m = getattr(reward, "model", None)
    return m if isinstance(m, nn.Module) else None


def print_role_memory(roles: dict[str, Optional[nn.Module]], trainable: tuple[str, ...]) -> dict[str, int]:
    sizes = {name: module_bytes(m) for name, m in roles.items()}
    parts = []
    for name, b in sizes.items():
        if roles[name] is None:
            parts.append(f"{name} -")
        elif name in trainable:
            parts.append(f"{name} {b / 2**20:.1f} MiB (+grads+AdamW ~{3 * b / 2**20:.1f} MiB)")
        else:
            parts.append(f"{name} {b / 2**20:.1f} MiB (frozen)")
    print("memory: " + ", ".join(parts))
    return sizes


def check_rl_config(cfg: Config) -> None:
    """What every RL stage needs: a starting policy, one reward source, a sampling temperature, counts >= 1."""
    rl = cfg.rl
    if not cfg.model.init:
        raise ConfigError(f"{cfg.stage} needs a starting policy: --model.init=runs/tiny/sft")
    if (rl.reward_model is None) == (rl.reward_fn is None):
        raise ConfigError("give exactly one of --rl.reward_model=RM_DIR or --rl.reward_fn=module:function")
    if rl.temperature <= 0:
        raise ConfigError(f"rl.temperature must be > 0 (got {rl.temperature}); RL samples from the policy")
    if rl.ppo_epochs < 1 or rl.minibatches < 1 or rl.prompts_per_step < 1:
        raise ConfigError("rl.ppo_epochs, rl.minibatches and rl.prompts_per_step must be >= 1")


@dataclass
class Roles:
    """The models of an RL run (the critic is PPO's own) and where the frozen ones live."""

    actor: nn.Module
    model_cfg: ModelConfig  # the starting policy's shape (dropout off)
    tok: ChatTokenizer
    ref: Optional[nn.Module]
    reward: Any  # a chatforge.rl.reward source
    device: torch.device
    offload: bool = False
    frozen_models: list = field(default_factory=list)

    @contextlib.contextmanager
    def frozen(self):
        """Frozen roles on the device only while they run (``rl.offload_frozen``)."""
        if not (self.offload and self.device.type != "cpu"):
            yield
            return
        for m in self.frozen_models:
            m.to(self.device)
        try:
            yield
        finally:
            for m in self.frozen_models:
                m.to("cpu")

    def frozen_forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run a frozen role in inference mode; the result is cloned into a normal tensor (usable in losses)."""
        with self.frozen(), torch.inference_mode():
            out = fn()
        return out.clone()


def load_roles(cfg: Config, device: torch.device, *, need_ref: bool) -> Roles:
    """(check_rl_config first.) The actor (``model.init``, LoRA when ``lora.r`` > 0, dropout off), its frozen reference when needed, and the
    reward source (an RM is checked to share the policy's tokenizer)."""
    actor, mcfg, tok = load_causal_lm(cfg.model.init, device, trust_remote_code=cfg.model.trust_remote_code)
    mcfg.dropout = 0.0
    actor = disable_dropout(apply_lora(actor, cfg.lora))  # LoRA: no-op unless lora.r > 0
    ref = freeze(reference_from(actor)) if need_ref else None  # LoRA: adapters off, no copy
    reward = load_reward(cfg.rl, device)
    if cfg.rl.reward_model is not None and hasattr(reward, "check_tokenizer"):
        reward.check_tokenizer(tok)
    rm = reward_module(reward)
    if rm is not None:
        freeze(rm)
    frozen = [m for m in (ref, rm) if m is not None]
    if cfg.rl.offload_frozen:
        for m in frozen:
            m.to("cpu")
    return Roles(actor, mcfg, tok, ref, reward, device, cfg.rl.offload_frozen, frozen)
