"""The native GPT's KV cache for continuous batching: :class:`SlotCache` holds the keys/values of up to
``rows`` requests that join and leave at any step, and looks like :class:`~chatforge.model.inference.KVCache` to
the model (see :mod:`chatforge.scheduler` for how the scheduler uses it)."""

from __future__ import annotations

from typing import Optional

import torch

from chatforge.model.inference import KVCache


class SlotCache:
    """Keys/values of up to ``rows`` requests that join and leave at any step (see the module docstring).

    Storage k, v: (n_layer, rows, n_kv_head, max_len, hd); rows [0, n) are active. Seen by the model as a
    :class:`~chatforge.model.inference.KVCache` of batch n: ``valid`` (n, max_len) bool, ``next_pos`` (n,),
    ``length`` (slots used so far, shared), ``update``, ``active_kv``, ``advance``.
    """

    def __init__(self, n_layer: int, rows: int, n_kv_head: int, max_len: int, head_dim: int, device=None,
                 dtype: torch.dtype = torch.float32):
        shape = (n_layer, rows, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid_all = torch.zeros(rows, max_len, device=device, dtype=torch.bool)
        self.pos_all = torch.zeros(rows, device=device, dtype=torch.long)
        self.rows, self.max_len = rows, max_len
        self.n = 0
        self.length = 0
        self.padded = True  # rows joined at different lengths: decode steps read the validity mask
        self.fused = None  # the weights arranged for generation (model.inference.inference_weights): the scheduler's

    @property
    def valid(self) -> torch.Tensor:
        return self.valid_all[: self.n]  # (n, max_len) view: the model writes the new slot through it

    @property
    def next_pos(self) -> torch.Tensor:
        return self.pos_all[: self.n]  # (n,)

    def active_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every layer and active row, (n_layer, n, n_kv_head, max_len, hd) views."""
        return self.k[:, : self.n], self.v[:, : self.n]

    def nbytes_per_row(self) -> int:
        """Bytes of keys + values one request holds (its row of the storage)."""
        return 2 * self.k[:, 0].numel() * self.k.element_size()

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (n, Hkv, T, hd) into slots [length, length+T) -> all keys/values (n, Hkv, length+T, hd)."""
        L, T, n = self.length, k.shape[2], self.n
        self.k[layer, :n, :, L:L + T] = k
        self.v[layer, :n, :, L:L + T] = v
        return self.k[layer, :n, :, :L + T], self.v[layer, :n, :, :L + T]

    def advance(self, mask: Optional[torch.Tensor], T: int) -> None:
        if mask is not None:
            raise ValueError("SlotCache takes decode steps only (prefill into a KVCache, then add_rows)")
        self.valid_all[: self.n, self.length:self.length + T] = True
        self.pos_all[: self.n] += T
        self.length += T

    def add_rows(self, src: KVCache) -> list[int]:
        """Append the rows of a prefilled cache (left-padded prompts); returns their row indices."""
        b, P = src.k.shape[1], src.length
        if self.n + b > self.rows:
            raise ValueError(f"no free rows: {self.n} + {b} > {self.rows}")
        if self.length < P:  # make room before `length`: shift every active row right by P - length
            d, L, n = P - self.length, self.length, self.n
            self.k[:, :n, :, d:d + L] = self.k[:, :n, :, :L].clone()
            self.v[:, :n, :, d:d + L] = self.v[:, :n, :, :L].clone()
            self.valid_all[:n, d:d + L] = self.valid_all[:n, :L].clone()
            self.valid_all[:n, :d] = False
            self.length = P
        L, r = self.length, slice(self.n, self.n + b)
        self.k[:, r, :, L - P:L] = src.k[:, :, :, :P]
        self.v[:, r, :, L - P:L] = src.v[:, :, :, :P]
        self.valid_all[r] = False
        self.valid_all[r, L - P:L] = src.valid[:, :P]
        self.pos_all[r] = src.next_pos
        self.n += b
        return list(range(r.start, r.stop))

    def remove_row(self, row: int) -> Optional[int]:
        """Free ``row``: the last active row moves into it. Returns the index that moved (None if none did)."""
        last = self.n - 1
        moved = None
        if row != last:
            L = self.length
            self.k[:, row, :, :L] = self.k[:, last, :, :L]
            self.v[:, row, :, :L] = self.v[:, last, :, :L]
            self.valid_all[row] = self.valid_all[last]
            self.pos_all[row] = self.pos_all[last]
            moved = last
        self.valid_all[last] = False
        self.n -= 1
        if self.n == 0:
            self.length = 0
        return moved

    def compact(self) -> None:
        """Squeeze out invalid slots: each row's valid slots (in order) end at the new ``length`` = the largest
        number of valid slots of a row."""
        n, L = self.n, self.length
        valid = self.valid_all[:n, :L]  # (n, L)
        new_len = int(valid.sum(1).max()) if n else 0
        order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)[:, L - new_len:]  # (n, new_len): valid last
        idx = order[None, :, None, :, None].expand(self.k.shape[0], n, self.k.shape[2], new_len, self.k.shape[4])
        self.k[:, :n, :, :new_len] = torch.gather(self.k[:, :n, :, :L], 3, idx)
        self.v[:, :n, :, :new_len] = torch.gather(self.v[:, :n, :, :L], 3, idx)
        self.valid_all[:n, :new_len] = torch.gather(valid, 1, order)
        self.valid_all[:n, new_len:] = False
        self.length = new_len
