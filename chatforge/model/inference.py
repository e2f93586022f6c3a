"""What a generation keeps beside a native model's weights: the KV cache, and the weights arranged for decoding
(q|k|v and gate|up concatenated, prepacked for oneDNN on a CPU where that pays).

The model (chatforge/model/gpt.py) reads both through its ``cache`` argument: ``cache.fused`` None means the
modules' own weights (training, LoRA, FSDP), else the :class:`InferenceWeights` a generation arranged once.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def layer_views(x: torch.Tensor) -> list[torch.Tensor]:
    """x[0], x[1], ... as separate views (not ``unbind``'s, which may not be written in place under autograd)."""
    return [x[i] for i in range(x.shape[0])]



class KVCache:
    """Preallocated keys/values of every layer for incremental decoding.

    k, v: (n_layer, B, n_kv_head, max_len, hd); slot j holds the j-th token fed to the model.
    valid: (B, max_len) bool, False for padding slots (never attended to).
    next_pos: (B,) position the next real token of each row will get.
    length: number of slots filled so far (the same for every row).
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype: torch.dtype = torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k_layers, self.v_layers = layer_views(self.k), layer_views(self.v)  # per-layer views, made once
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.next_pos = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.length = 0
        self.max_len = max_len
        self.padded = False
        """True once a padding slot is stored: decode steps then need the validity mask."""
        self.fused: Optional[InferenceWeights] = None
        """The weights arranged for generation (see :func:`inference_weights`); None = the modules' own."""

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, Hkv, T, hd) at slots [length, length+T) of ``layer``;
        return all keys/values so far, (B, Hkv, length+T, hd)."""
        L, T = self.length, k.shape[2]
        ks, vs = self.k_layers[layer], self.v_layers[layer]  # (B, Hkv, max_len, hd)
        ks.narrow(2, L, T).copy_(k)
        vs.narrow(2, L, T).copy_(v)
        return ks.narrow(2, 0, L + T), vs.narrow(2, 0, L + T)

    def sub(self, batch_size: int, max_len: int) -> "KVCache":
        """An empty cache of the same layers, dtype, device and fused weights, for prefilling some rows apart
        (then :meth:`insert` them)."""
        n_layer, _, n_kv_head, _, head_dim = self.k.shape
        out = KVCache(n_layer, batch_size, n_kv_head, max_len, head_dim, self.k.device, self.k.dtype)
        out.fused = self.fused
        return out

    def insert(self, src: "KVCache", rows: Sequence[int], end: int) -> None:
        """Copy every slot ``src`` filled into ``rows`` of this empty cache at slots [end - src.length, end), the
        slots before staying padding; the cache's length becomes ``end`` (the same for every insert)."""
        if self.length not in (0, end):
            raise ValueError(f"insert into a cache of length {self.length}; inserts must all end at one slot")
        T, r = src.length, torch.tensor(list(rows), device=self.k.device)
        self.k[:, r, :, end - T:end] = src.k[:, :, :, :T]
        self.v[:, r, :, end - T:end] = src.v[:, :, :, :T]
        self.valid[r, end - T:end] = src.valid[:, :T]
        self.next_pos[r] = src.next_pos
        self.length = end
        self.padded = self.padded or src.padded or T < end

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only cache rows ``rows`` (n,), in that order (rows that finished generating leave the batch)."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        self.k_layers, self.v_layers = layer_views(self.k), layer_views(self.v)
        self.valid, self.next_pos = self.valid.index_select(0, rows), self.next_pos.index_select(0, rows)

    def advance(self, mask: Optional[torch.Tensor], T: int) -> None:
        """After all layers ran on T new tokens with (B, T) validity ``mask`` (None: all real): mark them stored."""
        if mask is None:
            self.valid[:, self.length:self.length + T] = True
            self.next_pos += T
        else:
            self.valid[:, self.length:self.length + T] = mask
            self.next_pos += mask.long().sum(1)
            self.padded = self.padded or not bool(mask.all())
        self.length += T


class FusedLayer(NamedTuple):
    """One block's projection weights for inference: q|k|v and gate|up concatenated (one product instead of three,
    two), each weight plain or prepacked for oneDNN (:func:`linear` takes either)."""
    qkv: torch.Tensor
    """cat(q_proj, k_proj, v_proj) weights, ((H + 2 Hkv) hd, C)."""
    o: torch.Tensor
    """o_proj's weight, (C, H hd)."""
    gate_up: torch.Tensor
    """cat(gate_proj, up_proj) weights, (2 h, C)."""
    down: torch.Tensor
    """down_proj's weight, (C, h)."""


class InferenceWeights(NamedTuple):
    """What a KV cache holds for its generation: every block's :class:`FusedLayer` and the LM head's weight."""
    layers: list[FusedLayer]
    head: torch.Tensor
    """lm_head's weight (V, C), plain or prepacked."""


PACK_MIN_WIDTH = 256
"""Model width (n_embd) from which generation on a CPU runs its products on weights prepacked for oneDNN. The
products of a decode step have few rows; on the 2-core AMD EPYC of benchmarks/RESULTS.md oneDNN's prepacked
kernels take ~25% less time than the default BLAS (MKL) at n_embd 384 (batch 1 and 16), but its fixed cost per
call loses at n_embd 128, where the products are tiny."""


def packs_weights(width: int, device, dtype: torch.dtype) -> bool:
    """True where :func:`inference_weights` prepacks: fp32 on a CPU with oneDNN, no autocast, width >= PACK_MIN_WIDTH."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and width >= PACK_MIN_WIDTH
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w.T for a plain weight (out, in) or one prepacked for oneDNN -> (..., out)."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    return F.linear(x, w)


def inference_weights(model: nn.Module) -> Optional[InferenceWeights]:
    """The model's weights arranged for generation (:class:`InferenceWeights`), or None when a projection is not a
    plain ``nn.Linear`` holding a plain tensor (LoRA adapters, FSDP-sharded parameters): those keep their modules.
    Prepacked for oneDNN where :func:`packs_weights` says so.

    A copy of the weights as they are now: a KV cache holds it for its lifetime (one generation), during which
    the weights do not change; the next cache copies them again, so training steps, loading and LoRA are seen.
    """
    linears = [model.lm_head]
    for block in model.model.layers:
        a, m = block.self_attn, block.mlp
        linears += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj]
    if any(type(lin) is not nn.Linear or lin.bias is not None
           or type(lin.weight) not in (torch.Tensor, nn.Parameter) for lin in linears):
        return None
    w = model.lm_head.weight
    pack = packs_weights(model.cfg.n_embd, w.device, w.dtype)

    def arranged(*parts: nn.Linear) -> torch.Tensor:
        t = torch.cat([p.weight for p in parts]) if len(parts) > 1 else parts[0].weight.detach()
        return torch.ops.mkldnn._reorder_linear_weight(t, 16) if pack else t  # 16: a decode step's batch

    with torch.no_grad():
        layers = [FusedLayer(arranged(b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj),
                             arranged(b.self_attn.o_proj), arranged(b.mlp.gate_proj, b.mlp.up_proj),
                             arranged(b.mlp.down_proj)) for b in model.model.layers]
        return InferenceWeights(layers, arranged(model.lm_head))
