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
from typing import Optional

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
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


_INV_FREQ: dict[tuple, torch.Tensor] = {}


def rope_inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    """inv_freq = 1 / theta^(arange(0, hd, 2) / hd), (hd/2,) fp32; computed once per (hd, theta, device) and kept
    outside the module (a buffer would be rounded by ``.to(bf16)``)."""
    key = (head_dim, float(theta), str(device))
    if key not in _INV_FREQ:
        _INV_FREQ[key] = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float) / head_dim))
    return _INV_FREQ[key]


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for integer positions ``pos`` (B, T) or (1, T) -> two (B, T, hd) tensors.

    angles = pos * inv_freq (see :func:`rope_inv_freq`), duplicated as cat(freqs, freqs) for the rotate-half
    convention, always in fp32.
    """
    freqs = pos[..., None].float() * rope_inv_freq(head_dim, theta, pos.device)  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by the angles in cos/sin (B, T, hd)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, hd): broadcast over heads
    return x * cos + rotate_half(x) * sin


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
        self.valid = torch.zeros(batch_size, max_len, device=device, dtype=torch.bool)
        self.next_pos = torch.zeros(batch_size, device=device, dtype=torch.long)
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, Hkv, T, hd) at slots [length, length+T) of ``layer``;
        return all keys/values so far, (B, Hkv, length+T, hd)."""
        L, T = self.length, k.shape[2]
        self.k[layer, :, :, L:L + T] = k
        self.v[layer, :, :, L:L + T] = v
        return self.k[layer, :, :, :L + T], self.v[layer, :, :, :L + T]

    def advance(self, mask: Optional[torch.Tensor], T: int) -> None:
        """After all layers ran on T new tokens with (B, T) validity ``mask`` (None: all real): mark them stored."""
        if mask is None:
            self.valid[:, self.length:self.length + T] = True
            self.next_pos += T
        else:
            self.valid[:, self.length:self.length + T] = mask
            self.next_pos += mask.long().sum(1)
        self.length += T


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

    def forward(self, x, cos, sin, attn_mask=None, cache: Optional[KVCache] = None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd), S = cached + T
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be fp32 under autocast
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,  # (B, 1, T, S) bool, True = may attend; None = causal fast path
            is_causal=attn_mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv_head != self.n_head,  # each group of H/Hkv query heads shares a k/v head
        )  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.n_embd, mlp_hidden_size(cfg)
        self.gate_proj = nn.Linear(d, h, bias=False)
        self.up_proj = nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block (HF ``LlamaDecoderLayer`` names), with optional residual dropout."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, attn_mask=None, cache=None):
        x = x + self.resid_dropout(self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache))
        x = x + self.resid_dropout(self.mlp(self.post_attention_layernorm(x)))
        return x


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
                cache: Optional[KVCache] = None) -> torch.Tensor:
        B, T = idx.shape
        if cache is None and T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds the context length model.block_size={self.cfg.block_size}")
        if cache is not None and cache.length + T > cache.max_len:
            raise ValueError(f"KV cache full: {cache.length} + {T} tokens > max_len={cache.max_len}")
        x = self.drop(self.embed_tokens(idx))  # (B, T, C)

        if cache is None and attention_mask is None:
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
            attn_mask = None  # fast path: is_causal=True
        elif cache is not None and attention_mask is None and T == 1:  # decode one real token per row
            mask = None
            pos = cache.next_pos[:, None]  # (B, 1)
            cache.valid[:, cache.length] = True  # the new slot (advance() below marks it too)
            attn_mask = cache.valid[:, None, None, :cache.length + 1]  # (B, 1, 1, S): every valid slot is in the past
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
        cos, sin = rope_cos_sin(pos, self.head_dim, self.cfg.rope_theta, x.dtype)  # (B or 1, T, hd)

        for block in self.layers:
            x = block(x, cos, sin, attn_mask, cache)
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
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """idx (B, T) token ids; attention_mask (B, T) 1 = real, 0 = pad -> logits (B, T, V)."""
        return self.lm_head(self.model(idx, attention_mask, cache))

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype = torch.float32) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens."""
        return KVCache(self.cfg.n_layer, batch_size, kv_heads(self.cfg), max_len,
                       self.cfg.n_embd // self.cfg.n_head, device, dtype)

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
