"""What a generation keeps beside a native model's weights: the KV cache, and the weights arranged for decoding
(q|k|v and gate|up concatenated, prepacked for oneDNN on a CPU where that pays).

The model (chatforge/model/gpt.py) reads both through its ``cache`` argument: ``cache.fused`` None means the
modules' own weights (training, LoRA, FSDP), else the :class:`InferenceWeights` a generation arranged once.
"""

from __future__ import annotations

import math
import warnings
import weakref
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from chatforge.model.ops import apply_rope, rms_norm, rope_cos_sin


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
        self.split_attention = False
        """Whether decode steps attend by :meth:`segments` of rows (the engine turns it on: it orders a batch's rows
        longest prompt first)."""
        self._segments: Optional[tuple[list[int], list[int]]] = None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's k, v (B, Hkv, T, hd) at slots [length, length+T) of ``layer``;
        return all keys/values so far, (B, Hkv, length+T, hd)."""
        L, T = self.length, k.shape[2]
        ks, vs = self.k_layers[layer], self.v_layers[layer]  # (B, Hkv, max_len, hd)
        ks.narrow(2, L, T).copy_(k)
        vs.narrow(2, L, T).copy_(v)
        return ks.narrow(2, 0, L + T), vs.narrow(2, 0, L + T)

    def segments(self) -> tuple[list[int], list[int]]:
        """Row bounds [0, ..., B] and each segment's first slot: decode attends for each run of rows only to the
        slots from the first one holding a real token of any of them, so short prompts' left padding is not read
        at every step (:func:`attention_segments`). One segment of every slot when ``split_attention`` is off or
        nothing is padded."""
        if not (self.split_attention and self.padded):
            return [0, self.k.shape[1]], [0]
        if self._segments is None:
            first = self.valid[:, :self.length].to(torch.uint8).argmax(1).tolist()  # (B,) each row's first real slot
            self._segments = attention_segments(first)
        return self._segments

    def active_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every layer and row, (n_layer, B, n_kv_head, max_len, hd) each."""
        return self.k, self.v

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
        self._segments = None

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only cache rows ``rows`` (n,), in that order (rows that finished generating leave the batch)."""
        self.k, self.v = self.k.index_select(1, rows), self.v.index_select(1, rows)
        self.k_layers, self.v_layers = layer_views(self.k), layer_views(self.v)
        self.valid, self.next_pos = self.valid.index_select(0, rows), self.next_pos.index_select(0, rows)
        self._segments = None

    def advance(self, mask: Optional[torch.Tensor], T: int) -> None:
        """After all layers ran on T new tokens with (B, T) validity ``mask`` (None: all real): mark them stored."""
        if mask is None:
            self.valid[:, self.length:self.length + T] = True
            self.next_pos += T
        else:
            self.valid[:, self.length:self.length + T] = mask
            self.next_pos += mask.long().sum(1)
            self.padded = self.padded or not bool(mask.all())
            self._segments = None
        self.length += T


ATTENTION_CALL_ROWS_X_SLOTS = 96
"""What one more attention call per layer costs in a decode step, in (row, slot) pairs read: estimated from a
profile on the 2-core AMD EPYC of benchmarks/RESULTS.md (third pass), where a decode step's attention reads ~5-6
pairs per us per layer at ~11M parameters (6 heads of 64) and a call costs ~15 us more."""


def attention_segments(first: Sequence[int], call_cost: float = ATTENTION_CALL_ROWS_X_SLOTS
                       ) -> tuple[list[int], list[int]]:
    """Split rows, whose real tokens start at slots ``first`` (B,), into runs of consecutive rows, each attending
    from its earliest first slot: the runs minimise the padding slots read plus ``call_cost`` per run (dynamic
    programming over the runs of equal first slots, quadratic in their number; the slots after the first ones are
    read by any split alike). Rows ordered longest prompt first (earliest first slot first) gain the most.
    -> (row bounds [0, ..., B], each run's first slot)."""
    ends, values = [], []  # consecutive rows with the same first slot never need a cut between them
    for i, f in enumerate(first):
        if values and values[-1] == f:
            ends[-1] = i + 1
        else:
            ends.append(i + 1)
            values.append(f)
    n = len(values)
    starts = [0] + ends[:-1]  # row where item j begins
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for b in range(1, n + 1):  # best[b]: cost of items [0, b); a run of items [a, b) skips slots before its min
        lo = math.inf
        for a in range(b - 1, -1, -1):
            lo = min(lo, values[a])
            cost = best[a] + call_cost - (ends[b - 1] - starts[a]) * lo
            if cost < best[b]:
                best[b], cut[b] = cost, a
    items = [n]
    while items[-1] > 0:
        items.append(cut[items[-1]])
    items = items[::-1]
    bounds = [0] + [ends[j - 1] for j in items[1:]]
    return bounds, [min(values[a:b]) for a, b in zip(items, items[1:])]


class InferenceWeights(NamedTuple):
    """What a KV cache holds for its generation: the model's weights arranged for decoding and what
    :func:`decode_step` needs of its shape. Lists have one entry per block; a product's weight is plain or
    prepacked for oneDNN (:func:`linear` takes either)."""
    qkv: list[torch.Tensor]
    """cat(q_proj, k_proj, v_proj) weights, ((H + 2 Hkv) hd, C): one product instead of three."""
    o: list[torch.Tensor]
    """o_proj's weights, (C, H hd)."""
    gate_up: list[torch.Tensor]
    """cat(gate_proj, up_proj) weights, (2 h, C): one product instead of two."""
    down: list[torch.Tensor]
    """down_proj's weights, (C, h)."""
    input_norm: list[torch.Tensor]
    """input_layernorm's weights, (C,)."""
    post_norm: list[torch.Tensor]
    """post_attention_layernorm's weights, (C,)."""
    head: torch.Tensor
    """lm_head's weight (V, C)."""
    embed: torch.Tensor
    """embed_tokens' weight (V, C)."""
    norm: torch.Tensor
    """The final norm's weight (C,)."""
    eps: float
    """RMSNorm epsilon."""
    n_head: int
    """Query heads H."""
    n_kv_head: int
    """Key/value heads Hkv."""
    rope_cos: torch.Tensor
    """cos of every position's rotary angles, (block_size, hd), the numbers :func:`rope_cos_sin` gives."""
    rope_sin: torch.Tensor
    """signed sin of the same, (block_size, hd)."""
    rope_theta: float
    """RoPE base, for positions beyond the table."""


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

    cfg, trunk = model.cfg, model.model
    blocks = list(trunk.layers)
    with torch.no_grad():
        embed = trunk.embed_tokens.weight.detach()
        positions = torch.arange(cfg.block_size, device=embed.device)[None]  # (1, N)
        cos, sin = rope_cos_sin(positions, cfg.n_embd // cfg.n_head, cfg.rope_theta, embed.dtype)  # (1, N, 1, hd)
        return InferenceWeights(
            qkv=[arranged(b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj) for b in blocks],
            o=[arranged(b.self_attn.o_proj) for b in blocks],
            gate_up=[arranged(b.mlp.gate_proj, b.mlp.up_proj) for b in blocks],
            down=[arranged(b.mlp.down_proj) for b in blocks],
            input_norm=[b.input_layernorm.weight.detach() for b in blocks],
            post_norm=[b.post_attention_layernorm.weight.detach() for b in blocks],
            head=arranged(model.lm_head), embed=embed, norm=trunk.norm.weight.detach(), eps=cfg.norm_eps,
            n_head=cfg.n_head, n_kv_head=blocks[0].self_attn.n_kv_head, rope_cos=cos[0, :, 0], rope_sin=sin[0, :, 0],
            rope_theta=cfg.rope_theta)


_KEPT: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, InferenceWeights]]" = weakref.WeakKeyDictionary()
"""Prepacked weights kept between generations, per trunk, with the key of the parameters they were made from."""


def weights_key(model: nn.Module) -> Optional[tuple]:
    """What must be unchanged for arranged weights to still be the model's: each parameter's storage and version
    counter (load_state_dict and in-place edits bump it). None where a parameter has no version counter (made
    under ``torch.inference_mode``) or is not a plain tensor (FSDP's DTensor): nothing can be kept."""
    params = list(model.parameters())
    if any(type(q) not in (torch.Tensor, nn.Parameter) or q.is_inference() for q in params):
        return None
    return tuple((q.data_ptr(), q._version) for q in params)


def generation_weights(model: nn.Module) -> Optional[InferenceWeights]:
    """:func:`inference_weights` of the model, kept with it between generations where arranging costs (weights
    prepacked for oneDNN: ~37 ms at ~11M parameters on 2 CPU cores, a tenth of a 64-token generation at batch 1)
    while :func:`weights_key` is unchanged and no forward with autograd on ran since (training forgets them,
    :func:`forget_generation_weights`: torch's fused AdamW writes parameters without bumping their version
    counters). The kept copy costs one more copy of the weights in memory while the model lives and is not
    training; plain (unpacked) arrangements are made per generation (a concatenation: cheap)."""
    head = model.lm_head.weight
    key = weights_key(model) if packs_weights(model.cfg.n_embd, head.device, head.dtype) else None  # None: no keeping
    kept = _KEPT.get(model.model)
    if key is not None and kept is not None and kept[0] == key:
        return kept[1]
    arranged = inference_weights(model)
    if key is not None and arranged is not None:
        _KEPT[model.model] = (key, arranged)
    else:
        _KEPT.pop(model.model, None)
    return arranged


def forget_generation_weights(trunk: nn.Module) -> None:
    """Drop the arranged weights kept for ``trunk`` (its forward with autograd on calls this: the weights may be
    about to change, and training should not hold a second copy)."""
    _KEPT.pop(trunk, None)


def decode_blocks(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                  k_cache: torch.Tensor, v_cache: torch.Tensor, length: int, qkv: list[torch.Tensor],
                  o: list[torch.Tensor], gate_up: list[torch.Tensor], down: list[torch.Tensor],
                  input_norm: list[torch.Tensor], post_norm: list[torch.Tensor], n_head: int, n_kv_head: int,
                  eps: float, bounds: list[int], starts: list[int]) -> torch.Tensor:
    """The blocks of one decode step: x (B, C) the new tokens' embeddings -> their hidden states (B, C), each
    block's key and value written to slot ``length`` of k_cache, v_cache (n_layer, B, Hkv, max_len, hd).

    cos, sin (B, 1, hd): the rows' rotary angles; mask (B, 1, 1, length + 1) bool (True = may attend) or None
    (every slot holds a real token); rows [bounds[j], bounds[j + 1]) attend to slots from starts[j] on
    (:meth:`KVCache.segments`). Written for TorchScript as well as Python (:func:`decode_step` runs it scripted
    where it can: the same operations without the interpreter's cost per operation)."""
    B, H, Hkv = x.shape[0], n_head, n_kv_head
    hd = cos.shape[-1]
    for i in range(len(qkv)):
        h = linear(rms_norm(x, input_norm[i], eps), qkv[i]).view(B, H + 2 * Hkv, hd)  # (B, H + 2 Hkv, hd)
        qk = apply_rope(h[:, :H + Hkv], cos, sin)  # (B, H + Hkv, hd)
        k_layer, v_layer = k_cache[i], v_cache[i]  # (B, Hkv, max_len, hd)
        k_layer[:, :, length] = qk[:, H:]
        v_layer[:, :, length] = h[:, H + Hkv:]
        q = qk[:, :H].unsqueeze(2)  # (B, H, 1, hd)
        ys: list[torch.Tensor] = []
        for j in range(len(starts)):  # a run of rows attends to the slots from its first real token on
            a, b, s = bounds[j], bounds[j + 1], starts[j]
            k, v = k_layer[a:b, :, s:length + 1], v_layer[a:b, :, s:length + 1]  # (b - a, Hkv, S, hd)
            if k.dtype != q.dtype:  # the cache may be fp32 under autocast
                k, v = k.to(q.dtype), v.to(q.dtype)
            m = mask[a:b, :, :, s:] if mask is not None else None
            ys.append(F.scaled_dot_product_attention(q[a:b], k, v, attn_mask=m, enable_gqa=Hkv != H))
        y = ys[0] if len(ys) == 1 else torch.cat(ys)  # (B, H, 1, hd)
        x = x + linear(y.reshape(B, H * hd), o[i])  # (B, C)
        gate, up = linear(rms_norm(x, post_norm[i], eps), gate_up[i]).chunk(2, dim=-1)  # (B, h) each
        x = x + linear(F.silu(gate) * up, down[i])
    return x


_SCRIPTED: list = []  # [decode_blocks compiled by TorchScript, or None where that failed], filled on first use


def scripted_decode_blocks():
    """:func:`decode_blocks` compiled by TorchScript (once per process), or None where TorchScript cannot compile it
    (then the Python function runs: the same operations, ~1 ms more per decode step at ~11M parameters on 2 CPU
    cores). TorchScript is deprecated in favour of torch.compile, whose compilation takes tens of seconds per
    shape on a CPU (benchmarks/RESULTS.md) where this takes a fraction of one."""
    if not _SCRIPTED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                _SCRIPTED.append(torch.jit.script(decode_blocks))
        except Exception:  # noqa: BLE001 - any failure to compile: the Python function computes the same
            _SCRIPTED.append(None)
    return _SCRIPTED[0]


def decode_step(w: InferenceWeights, ids: torch.Tensor, cache, scripted: bool = True) -> torch.Tensor:
    """One decode step of the native model on its arranged weights: ids (B,), one new token per row ->
    logits (B, V) of the token after it; the cache (a :class:`KVCache`, or anything with its ``valid``,
    ``next_pos``, ``length``, ``padded``, ``active_kv`` and ``advance``; ``segments`` optional) gains the slot.

    The operations of ``GPT.forward(ids[:, None], cache=cache)`` in the same order on the same numbers (tests
    compare them bit for bit), with no module calls, the rotary angles read from a table, and the blocks run by
    TorchScript (``scripted``, not under autocast): a decode step at batch 1 costs mostly its operations' dispatch.
    Where the cache splits attention (:meth:`KVCache.segments`), each run of rows reads only the slots from its
    first real token on (the same numbers up to rounding: fewer masked keys in the softmax's blocks).
    """
    x = F.embedding(ids, w.embed)  # (B, C)
    pos = cache.next_pos  # (B,)
    if cache.max_len <= w.rope_cos.shape[0]:  # every position the cache can hold is in the table
        cos, sin = w.rope_cos[pos].unsqueeze(1), w.rope_sin[pos].unsqueeze(1)  # (B, 1, hd), x's dtype (embed's)
    else:  # a cache longer than the context (a server's): compute them, as the modules do
        cos, sin = rope_cos_sin(pos[:, None], w.rope_cos.shape[1], w.rope_theta, x.dtype)  # (B, 1, 1, hd)
        cos, sin = cos[:, 0], sin[:, 0]  # (B, 1, hd)
    L = cache.length
    cache.valid[:, L] = True  # the new slot (advance() below marks it too)
    mask = cache.valid[:, None, None, :L + 1] if cache.padded else None  # (B, 1, 1, S); None: every slot is real
    run = scripted_decode_blocks() if scripted and not torch.is_autocast_enabled(x.device.type) else None
    k, v = cache.active_kv()
    bounds, starts = cache.segments() if hasattr(cache, "segments") else ([0, ids.shape[0]], [0])
    x = (run or decode_blocks)(x, cos, sin, mask, k, v, L, w.qkv, w.o, w.gate_up, w.down, w.input_norm,
                               w.post_norm, w.n_head, w.n_kv_head, w.eps, bounds, starts)
    cache.advance(None, 1)
    return linear(rms_norm(x, w.norm, w.eps), w.head)  # (B, V)
