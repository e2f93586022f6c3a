"""The native model's elementwise functions, shared by its modules (chatforge/model/gpt.py) and the flat decode
step (chatforge/model/inference.py), so that both compute the same numbers: RMSNorm and rotary embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, computed in fp32 like transformers' LlamaRMSNorm."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, [x.shape[-1]], weight, eps)  # one call, the same numbers
    return weight * F.rms_norm(x.float(), [x.shape[-1]], eps=eps).to(x.dtype)


_ROPE_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_constants(head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """inv_freq = 1 / theta^(arange(0, hd, 2) / hd), (hd/2,) fp32, and the sign (hd,) = (-1, ..., -1, 1, ..., 1)
    of the rotate-half convention; computed once per (hd, theta, device) and kept outside the module (a buffer
    would be rounded by ``.to(bf16)``). Kept as normal tensors even when first made during generation (inference
    mode): a compiled training forward saves them for its backward, which inference tensors cannot be; under
    torch.compile they are made inside the graph instead (a traced cache would hold the tensors of whichever
    mode compiled first)."""
    if torch.compiler.is_compiling():
        return _rope_constants(head_dim, theta, device)
    key = (head_dim, float(theta), str(device))
    if key not in _ROPE_CONSTANTS:
        with torch.inference_mode(False):
            _ROPE_CONSTANTS[key] = _rope_constants(head_dim, theta, device)
    return _ROPE_CONSTANTS[key]


def _rope_constants(head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
    sign = torch.ones(head_dim, device=device)
    sign[: head_dim // 2] = -1.0
    return inv_freq, sign


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables for integer positions ``pos`` (B, T) or (1, T) -> two (B, T, 1, hd) tensors
    (broadcast over heads).

    angles = pos * inv_freq (see :func:`rope_constants`), duplicated as cat(freqs, freqs) for the rotate-half
    convention, in fp32. The sin table's first half is negated, so that transformers' ``rotate_half(x) * sin``
    is ``roll(x, hd/2) * signed_sin`` (:func:`apply_rope`), the same numbers in fewer operations.
    """
    inv_freq, sign = rope_constants(head_dim, theta, pos.device)
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    cos, sin = emb.cos(), emb.sin() * sign
    if dtype != torch.float32:
        cos, sin = cos.to(dtype), sin.to(dtype)
    return cos.unsqueeze(2), sin.unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., H, hd) by the angles in cos / signed sin (..., 1, hd) (see :func:`rope_cos_sin`):
    x * cos + rotate_half(x) * sin, where rotate_half((x1, x2)) = (-x2, x1)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin
