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

KV cache. :class:`KVCache` (chatforge/model/inference.py) holds preallocated keys/values for
every layer. Use: prefill with the whole (left-padded) prompt and its ``attention_mask``, then
decode one token per call (no mask needed). The logits equal a full forward.

Branches. ``branches`` (B, T) instead of a mask lays out a shared prefix and continuations of it in
one row (:func:`branch_layout`): a preference pair's prompt and both answers, the prompt computed once.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.config import ConfigError, ModelConfig
from chatforge.model.inference import (InferenceWeights, KVCache, decode_step, forget_generation_weights,
                                      generation_weights, linear)
from chatforge.model.ops import apply_rope, rms_norm, rope_cos_sin


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
        return rms_norm(x, self.weight, self.eps)


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
        qkv = linear(x, fused.qkv[self.layer_idx]).view(B, T, H + 2 * Hkv, hd)  # one product for the three
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
        return self.o_proj(y) if fused is None else linear(y, fused.o[self.layer_idx])


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
        gate, up = linear(x, fused.gate_up[self.layer_idx]).chunk(2, dim=-1)  # one product for the two
        return linear(F.silu(gate) * up, fused.down[self.layer_idx])


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
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            forget_generation_weights(self)  # training: kept arranged weights would cost memory (and may go stale)
        if branches is not None and (cache is not None or attention_mask is not None):
            raise ValueError("branches replace attention_mask and cannot be used with a KV cache")
        if cache is None and branches is None and T > self.cfg.block_size:
            raise ValueError(f"sequence length {T} exceeds the context length model.block_size={self.cfg.block_size}")
        if cache is not None and cache.length + T > cache.max_len:
            raise ValueError(f"KV cache full: {cache.length} + {T} tokens > max_len={cache.max_len}")
        x = self.embed_tokens(idx)  # (B, T, C)
        if self.training and self.drop.p > 0:
            x = self.drop(x)

        causal = True  # with attn_mask None: the causal fast path; False = every key (one query per row)
        mask = None  # (B, T) validity of the new tokens, for the cache
        if branches is not None:  # a shared prefix and its continuations in each row
            pos, attn_mask = branch_layout(branches)  # (B, T), (B, 1, T, T)
            if int(pos.max()) >= self.cfg.block_size:
                raise ValueError(f"a branch reaches position {int(pos.max())}, beyond the context length "
                                 f"model.block_size={self.cfg.block_size}")
        elif cache is None and attention_mask is None:
            pos = torch.arange(T, device=idx.device)[None]  # (1, T)
            attn_mask = None  # fast path: is_causal=True
        elif cache is not None and attention_mask is None and T == 1:  # decode one real token per row
            pos = cache.next_pos[:, None]  # (B, 1)
            cache.valid[:, cache.length] = True  # the new slot (advance() below marks it too)
            if cache.padded:  # (B, 1, 1, S): every valid slot is in the past
                attn_mask = cache.valid[:, None, None, :cache.length + 1]
            else:  # every stored slot is a real token: attend to all of them, no mask
                attn_mask, causal = None, False
        elif cache is not None and cache.length == 0 and (attention_mask is None or bool(attention_mask.all())):
            pos = torch.arange(T, device=idx.device)[None]  # (1, T): unpadded prompts, the causal fast path
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
        fused = cache.fused if cache is not None else None
        if fused is not None and idx.shape[1] == 1 and attention_mask is None and cache.length < cache.max_len:
            return decode_step(fused, idx[:, 0], cache)[:, None]  # (B, 1, V): a decode step, the same numbers
        h = self.model(idx, attention_mask, cache)  # (B, T, C)
        h = h[:, -1:] if last_only else h
        return self.lm_head(h) if fused is None else linear(h, fused.head)

    def make_cache(self, batch_size: int, max_len: int, device=None, dtype: torch.dtype = torch.float32,
                   fused: Optional[InferenceWeights] = None) -> KVCache:
        """An empty KV cache for ``batch_size`` rows of up to ``max_len`` tokens, holding the fused projection
        weights when no gradient is recorded (generation): ``fused`` when given (weights fused earlier and still
        current, e.g. a server's), else :func:`generation_weights`: the weights as they are now."""
        cache = KVCache(self.cfg.n_layer, batch_size, kv_heads(self.cfg), max_len,
                        self.cfg.n_embd // self.cfg.n_head, device, dtype)
        if not torch.is_grad_enabled():
            cache.fused = fused if fused is not None else generation_weights(self)
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
