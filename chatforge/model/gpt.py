"""The native model: the Llama architecture in one file.

RMSNorm -> grouped-query attention with rotary embeddings -> residual,
RMSNorm -> SwiGLU MLP -> residual, repeated n_layer times, a final RMSNorm and a
(possibly tied) linear head. No biases anywhere.

The module names equal those of transformers' ``LlamaForCausalLM``, so
``GPT.state_dict()`` *is* a Hugging Face Llama state dict::

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                       (the same tensor as embed_tokens when tied)

Padding and positions. ``attention_mask`` is (B, T) with 1 = real token and
0 = padding. Token positions are ``cumsum(mask) - 1`` (clamped at 0), so a
left-padded row sees the same positions, and gives the same outputs at its real
tokens, as the unpadded row. Padded keys are never attended to. With no mask and
no cache the fast path ``is_causal=True`` is used.

KV cache. :class:`KVCache` holds preallocated keys/values for every layer. Use:
prefill with the whole (left-padded) prompt and its ``attention_mask``, then
decode one token per call (no mask needed). The logits equal a full forward.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.config import ConfigError, ModelConfig


def mlp_hidden_size(cfg: ModelConfig) -> int:
    """SwiGLU inner size: ``cfg.intermediate_size``, or Llama's rule int(8d/3) rounded up to a multiple of 32."""
    if cfg.intermediate_size:
        return cfg.intermediate_size
    return -(-int(8 * cfg.n_embd / 3) // 32) * 32


def kv_heads(cfg: ModelConfig) -> int:
    """Number of key/value heads (``n_kv_head`` or, when None, ``n_head``)."""
    return cfg.n_kv_head or cfg.n_head


def check_config(cfg: ModelConfig) -> None:
    """Raise a clear error for shapes the architecture cannot build."""
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"model.n_embd={cfg.n_embd} must be divisible by model.n_head={cfg.n_head}")
    if cfg.n_head % kv_heads(cfg):
        raise ConfigError(f"model.n_head={cfg.n_head} must be divisible by model.n_kv_head={kv_heads(cfg)}")
    if (cfg.n_embd // cfg.n_head) % 2:
        raise ConfigError(f"head size n_embd/n_head={cfg.n_embd // cfg.n_head} must be even for RoPE")


# ----------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps), computed in fp32 like transformers' LlamaRMSNorm."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one call, the same numbers
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


_ROPE_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_constants(head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """inv_freq = 1 / theta^(arange(0, hd, 2) / hd), (hd/2,) fp32, and the sign (hd,) = (-1, ..., -1, 1, ..., 1)
    of the rotate-half convention; computed once per (hd, theta, device) and kept outside the module (a buffer
    would be rounded by ``.to(bf16)``)."""
    key = (head_dim, float(theta), str(device))
    if key not in _ROPE_CONSTANTS:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
        sign = torch.ones(head_dim, device=device)
        sign[: head_dim // 2] = -1.0
        _ROPE_CONSTANTS[key] = inv_freq, sign
    return _ROPE_CONSTANTS[key]


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
    """Rotate x (B, T, H, hd) by the angles in cos / signed sin (B, T, 1, hd) (see :func:`rope_cos_sin`):
    x * cos + rotate_half(x) * sin, where rotate_half((x1, x2)) = (-x2, x1)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def layer_views(x: torch.Tensor) -> list[torch.Tensor]:
    """x[0], x[1], ... as separate views (not ``unbind``'s, which may not be written in place under autograd)."""
    return [x[i] for i in range(x.shape[0])]


def branch_layout(branches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions and attention mask of rows that hold a shared prefix followed by continuations of it.

    branches (B, T) long: 0 = the prefix (first in the row), k >= 1 = the k-th continuation (each contiguous,
    after the prefix), -1 = padding. A token attends to the prefix and to the earlier tokens of its own branch, and
    its position is the number of those before it, so every branch sees exactly what it would see as its own
    sequence (prefix + branch) while the prefix is computed once. -> positions (B, T) long, mask (B, 1, T, T) bool
    (True = may attend; a padding query attends to itself only, so no row is empty).
    """
    T = branches.shape[1]
    q, k = branches[:, :, None], branches[:, None, :]  # (B, T, 1), (B, 1, T)
    slots = torch.arange(T, device=branches.device)
    past = slots[None, :] <= slots[:, None]  # (T, T) key slot <= query slot
    seen = past[None] & (k >= 0) & ((k == 0) | (k == q)) & (q >= 0)  # (B, T, T)
    pos = (seen.sum(-1) - 1).clamp(min=0)  # (B, T)
    mask = seen | torch.eye(T, dtype=torch.bool, device=branches.device)[None]  # padding queries see themselves
    return pos, mask[:, None]


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


def inference_weights(model: "GPT") -> Optional[InferenceWeights]:
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


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE (HF ``LlamaAttention`` names)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = cfg.n_head
        self.n_kv_head = kv_heads(cfg)
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        d, hd = cfg.n_embd, self.head_dim
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=False)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[KVCache]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q (B, T, H, hd), k and v (B, T, Hkv, hd), RoPE applied to q and k."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        fused = cache.fused if cache is not None else None
        if fused is None:
            q, k = self.q_proj(x).view(B, T, H, hd), self.k_proj(x).view(B, T, Hkv, hd)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin), self.v_proj(x).view(B, T, Hkv, hd)
        qkv = linear(x, fused.layers[self.layer_idx].qkv).view(B, T, H + 2 * Hkv, hd)  # one product for the three
        q, k = apply_rope(qkv[:, :, :H + Hkv], cos, sin).split((H, Hkv), dim=2)  # one rotation for q and k
        return q, k, qkv[:, :, H + Hkv:]

    def forward(self, x, cos, sin, attn_mask=None, cache: Optional[KVCache] = None, causal: bool = True):
        B, T, C = x.shape
        q, k, v = self.qkv(x, cos, sin, cache)  # (B, T, H, hd), (B, T, Hkv, hd), (B, T, Hkv, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, hd), (B, Hkv, T, hd) x 2
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd), S = cached + T
            if k.dtype != q.dtype:  # the cache may be fp32 under autocast
                k, v = k.to(q.dtype), v.to(q.dtype)
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,  # (B, 1, T, S) bool, True = may attend; None = causal (or all keys, see causal)
            is_causal=attn_mask is None and causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,  # each group of H/Hkv query heads shares a k/v head
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        fused = cache.fused if cache is not None else None
        return self.o_proj(y) if fused is None else linear(y, fused.layers[self.layer_idx].o)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        d, h = cfg.n_embd, mlp_hidden_size(cfg)
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x, cache: Optional[KVCache] = None):
        fused = cache.fused if cache is not None else None
        if fused is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        layer = fused.layers[self.layer_idx]
        gate, up = linear(x, layer.gate_up).chunk(2, dim=-1)  # one product for the two
        return linear(F.silu(gate) * up, layer.down)


class Block(nn.Module):
    """Pre-norm transformer block (HF ``LlamaDecoderLayer`` names), with optional residual dropout."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg, layer_idx)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask=None, cache=None, causal: bool = True):
        drop = self.training and self.resid_dropout.p > 0
        a = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, causal)
        x = x + (self.resid_dropout(a) if drop else a)
        m = self.mlp(self.post_attention_layernorm(x), cache)
        return x + (self.resid_dropout(m) if drop else m)


# ----------------------------------------------------------------------------- trunk and model


class Trunk(nn.Module):
    """Embeddings + blocks + final norm (HF ``LlamaModel``): ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        self.head_dim = cfg.n_embd // cfg.n_head
        self.embed_tokens = nn.Embedding(vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, branches: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``branches`` (B, T) instead of a mask: several continuations of one prefix in a row (see
        :func:`branch_layout`), e.g. a prompt and both answers of a preference pair, the prompt computed once."""
        B, T = idx.shape
        if branches is not None:
            if cache is not None or attention_mask is not None:
                raise ValueError("branches replace attention_mask and cannot be used with a KV cache")
            pos, attn_mask = branch_layout(branches)  # (B, T), (B, 1, T, T)
            if int(pos.max()) >= self.cfg.block_size:
                raise ValueError(f"a branch reaches position {int(pos.max())}, beyond the context length "
                                 f"model.block_size={self.cfg.block_size}")
            x = self.embed_tokens(idx)  # (B, T, C)
            if self.training and self.drop.p > 0:
                x = self.drop(x)
            cos, sin = rope_cos_sin(pos, self.head_dim, self.cfg.rope_theta, x.dtype)  # (B, T, 1, hd)
            for block in self.layers:
                x = block(x, cos, sin, attn_mask)
            return self.norm(x)  # (B, T, C)
        if cache is None and T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds the context length model.block_size={self.cfg.block_size}")
        if cache is not None and cache.length + T > cache.max_len:
            raise ValueError(f"KV cache full: {cache.length} + {T} tokens > max_len={cache.max_len}")
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.training and self.drop.p > 0:
            x = self.drop(x)

        causal = True  # with attn_mask None: the causal fast path; False = every key (one query per row)
        if cache is None and attention_mask is None:
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
            attn_mask = None  # fast path: is_causal=True
        elif cache is not None and attention_mask is None and T == 1:  # decode one real token per row
            mask = None
            pos = cache.next_pos[:, None]  # (B, 1)
            cache.valid[:, cache.length] = True  # the new slot (advance() below marks it too)
            if cache.padded:  # (B, 1, 1, S): every valid slot is in the past
                attn_mask = cache.valid[:, None, None, :cache.length + 1]
            else:  # every stored slot is a real token: attend to all of them, no mask
                attn_mask, causal = None, False
        elif cache is not None and cache.length == 0 and (attention_mask is None or bool(attention_mask.all())):
            mask = None  # prefill of unpadded prompts: positions 0..T-1, the causal fast path
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
            attn_mask = None
        else:
            mask = torch.ones_like(idx, dtype=torch.bool) if attention_mask is None else attention_mask.bool()  # (B, T)
            past = cache.length if cache is not None else 0
            start = cache.next_pos[:, None] if cache is not None else 0  # (B, 1) or 0
            pos = (start + mask.long().cumsum(1) - 1).clamp(min=0)  # (B, T): real tokens numbered 0, 1, ...
            key_valid = mask if cache is None else torch.cat([cache.valid[:, :past], mask], dim=1)  # (B, S)
            q_slot = past + torch.arange(T, device=idx.device)  # (T,)
            k_slot = torch.arange(past + T, device=idx.device)  # (S,)
            causal = k_slot[None, :] <= q_slot[:, None]  # (T, S)
            own = k_slot[None, :] == q_slot[:, None]  # (T, S): a pad query attends to itself, so no row is empty
            attn_mask = ((causal[None] & key_valid[:, None, :]) | own[None])[:, None]  # (B, 1, T, S)
        cos, sin = rope_cos_sin(pos, self.head_dim, self.cfg.rope_theta, x.dtype)  # (B or 1, T, 1, hd)

        for block in self.layers:
            x = block(x, cos, sin, attn_mask, cache, causal)
        if cache is not None:
            cache.advance(mask, T)
        return self.norm(x)  # (B, T, C)


class GPT(nn.Module):
    """Llama-architecture causal LM (HF ``LlamaForCausalLM`` names): ids (B, T) -> logits (B, T, V)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.model = Trunk(cfg, vocab_size)
        self.lm_head = nn.Linear(cfg.n_embd, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Normal(0, std) for every matrix and the embedding; the residual output projections
        (o_proj, down_proj) get std / sqrt(2 * n_layer) as in GPT-2; RMSNorm weights are 1."""
        init_trunk(self.model, std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, last_only: bool = False) -> torch.Tensor:
        """idx (B, T) token ids; attention_mask (B, T) 1 = real, 0 = pad -> logits (B, T, V)
        (``last_only``: (B, 1, V), the last position's only, as generation needs)."""
        h = self.model(idx, attention_mask, cache)  # (B, T, C)
        h = h[:, -1:] if last_only else h
        fused = cache.fused if cache is not None else None
        return self.lm_head(h) if fused is None else linear(h, fused.head)

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype = torch.float32,
                   fused: Optional[InferenceWeights] = None) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens, holding the fused projection
        weights when no gradient is recorded (generation): ``fused`` when given (weights fused earlier and still
        current, e.g. a server's), else :func:`inference_weights` of the weights now."""
        cache = KVCache(self.cfg.n_layer, batch_size, kv_heads(self.cfg), max_len,
                        self.cfg.n_embd // self.cfg.n_head, device, dtype)
        if not torch.is_grad_enabled():
            cache.fused = fused if fused is not None else inference_weights(self)
        return cache

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of (unique) parameters. ``exclude_embeddings`` drops the input embedding table
        (a lookup, no FLOPs) but keeps the output head (a matmul), even when the two are tied."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a tied tensor once
        if exclude_embeddings:
            n -= self.model.embed_tokens.weight.numel()
            if self.cfg.tie_embeddings:
                n += self.lm_head.weight.numel()
        return n

    def flops_per_token(self, seq_len: Optional[int] = None) -> float:
        """Training FLOPs per token (forward + backward), for MFU (PaLM appendix B, nanochat):
        6 * N (N = matmul parameters, see :meth:`num_params`) + 12 * L * d * T for the attention
        scores and weighted sum over a context of T = ``seq_len`` (default block_size) tokens
        (counted without the causal halving)."""
        T = seq_len or self.cfg.block_size
        return 6 * self.num_params(exclude_embeddings=True) + 12 * self.cfg.n_layer * self.cfg.n_embd * T


def init_trunk(trunk: Trunk, std: float = 0.02) -> None:
    """Initialise a trunk in place (see :meth:`GPT.init_weights`)."""
    resid_std = std / math.sqrt(2 * trunk.cfg.n_layer)
    for name, module in trunk.named_modules():
        if isinstance(module, nn.Linear):
            s = resid_std if name.endswith(("o_proj", "down_proj")) else std
            nn.init.normal_(module.weight, mean=0.0, std=s)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
