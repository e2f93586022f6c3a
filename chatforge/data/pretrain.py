"""Pretraining text -> token shards in the shared cache -> batches.

Documents are read as a stream (sources.py: .txt, .jsonl, .gz/.zst, parquet, folders, globs) and
tokenized once into the shared, content-addressed token cache (shards.py), each as
``<|endoftext|> + tokens``. The validation split is per document (``data.val_split='documents'``), a
separate ``data.val_path``, or the tail of the stream (``'tail'``, nanoGPT's Tiny Shakespeare rule).

Batches are drawn for the whole world and then sliced by rank, so a run on N processes sees
the same global batch as a run on one process with N times the accumulation. The loader's
position (a generator state or a cursor) is saved in checkpoints; it reads across shards as if
they were one array. Several corpora can be mixed by weight (``data.mixture``, MixtureLoader).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from chatforge.data.records import DataError
from chatforge.data.shards import DEFAULT_SHARD_TOKENS, build_shards, cache_root, open_streams
from chatforge.data.sources import EOT, corpus_files, iter_documents, tokenizer_sample  # noqa: F401 (re-exported)


@dataclass
class TokenData:
    """Token streams of a corpus (memory-mapped shards, read as one array each)."""

    train: "np.ndarray"
    """Training tokens: a TokenStream (len() and slices) or an array."""
    val: "np.ndarray"
    """Validation tokens."""
    meta: dict
    """Counts, bytes and fingerprints (the cache entry's index, plus 'dir')."""

    @property
    def val_bytes_per_token(self) -> float:
        return self.meta["val_bytes"] / max(1, self.meta["val_tokens"])


def build_token_data(paths: list[str], tok, cache_dir: Path, val_fraction: float, progress: bool = True, *,
                     split: str = "documents", val_paths: Optional[list[str]] = None,
                     shard_tokens: int = DEFAULT_SHARD_TOKENS) -> TokenData:
    """Tokenize a corpus once into the token cache ``cache_dir`` (reused while files, tokenizer and
    split are unchanged, by every run that names the same cache)."""
    files = corpus_files(paths)
    val_files = corpus_files(val_paths) if val_paths else None
    entry, index = build_shards(files, tok, cache=Path(cache_dir), split=split, val_fraction=val_fraction,
                                val_files=val_files, shard_tokens=shard_tokens, progress=progress)
    train, val = open_streams(entry, index)
    h = hashlib.sha256("|".join(f["sha256"] for f in index["files"]).encode()).hexdigest()[:16]
    meta = {**index, "dir": str(entry), "files": [str(f) for f in files + (val_files or [])],  # this run's paths
            "files_fingerprint": h}
    return TokenData(train, val, meta)


def data_from_config(dc, tok, progress: bool = True) -> list[tuple[str, TokenData, float]]:
    """(name, token data, weight) of every corpus of a DataConfig: ``data.mixture`` or ``data.path``."""
    common = dict(split=dc.val_split, shard_tokens=dc.shard_tokens)
    root = cache_root(dc.cache_dir)
    if not dc.mixture:
        return [("corpus", build_token_data(dc.path, tok, root, dc.val_fraction, progress,
                                            val_paths=dc.val_path or None, **common), 1.0)]
    out = []
    for i, src in enumerate(dc.mixture):
        if not hasattr(src, "get") or src.get("path") is None:
            raise DataError("<config>", None, f"data.mixture[{i}]: expected {{path: ..., weight: ...}}, got {src!r}")
        paths = src["path"] if not isinstance(src["path"], str) else [src["path"]]
        weight = float(src.get("weight", 1.0))
        if not weight > 0:
            raise DataError("<config>", None, f"data.mixture[{i}]: weight must be > 0, got {weight}")
        name = str(src.get("name") or Path(str(list(paths)[0]).rstrip("/")).stem.split(".")[0])
        if name in [n for n, _, _ in out]:
            name = f"{name}{i}"
        out.append((name, build_token_data(list(paths), tok, root, dc.val_fraction, progress, **common), weight))
    return out


def corpus_paths(dc) -> list[str]:
    """Every pretraining path of a DataConfig (data.path, or all of data.mixture's): the tokenizer's corpus."""
    if not dc.mixture:
        return list(dc.path)
    return [p for src in dc.mixture for p in ([src["path"]] if isinstance(src.get("path"), str) else list(src.get("path") or []))]


class Concat:
    """Several token streams read as one (len() and contiguous slices)."""

    def __init__(self, parts: list):
        self.parts = [p for p in parts if len(p)]
        self.offsets = np.concatenate([[0], np.cumsum([len(p) for p in self.parts], dtype=np.int64)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key) -> np.ndarray:
        a, b, _ = key.indices(len(self))
        out = []
        for i, p in enumerate(self.parts):
            lo, hi = max(a, int(self.offsets[i])), min(b, int(self.offsets[i + 1]))
            if lo < hi:
                out.append(np.asarray(p[lo - int(self.offsets[i]) : hi - int(self.offsets[i])]))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def __array__(self, dtype=None, copy=None):
        arr = self[0 : len(self)]
        return arr if dtype is None else arr.astype(dtype)


def combine(sources: list[tuple[str, TokenData, float]]) -> TokenData:
    """One TokenData for the stage: the single corpus, or the mixture's validation streams together."""
    if len(sources) == 1:
        return sources[0][1]
    metas = [d.meta for _, d, _ in sources]
    meta = {"files": [f for m in metas for f in m["files"]],
            "files_fingerprint": hashlib.sha256("|".join(m["files_fingerprint"] for m in metas).encode()).hexdigest()[:16],
            **{k: sum(m[k] for m in metas) for k in ("train_tokens", "val_tokens", "val_bytes", "documents", "bytes")},
            "sources": {n: {"dir": d.meta["dir"], "weight": w, "train_tokens": d.meta["train_tokens"]} for n, d, w in sources}}
    return TokenData(Concat([d.train for _, d, _ in sources]), Concat([d.val for _, d, _ in sources]), meta)


def make_loader(sources: list[tuple[str, TokenData, float]], block_size: int, batch_size: int, *,
                sampling: str = "random", seed: int = 0, rank: int = 0, world_size: int = 1, source: str = "corpus"):
    """A TokenLoader over the one corpus, or a MixtureLoader over several."""
    if len(sources) == 1:
        return TokenLoader(sources[0][1].train, block_size, batch_size, sampling=sampling, seed=seed, rank=rank,
                           world_size=world_size, source=source)
    if sampling != "random":
        raise DataError("<config>", None, "data.mixture samples random windows; use data.sampling=random")
    return MixtureLoader([(n, d.train, w) for n, d, w in sources], block_size, batch_size, seed=seed, rank=rank,
                         world_size=world_size)


class TokenLoader:
    """Batches of (x, y) windows of ``block_size`` tokens from a token stream.

    ``sampling='random'``: windows start at uniform random offsets drawn from the loader's own
    generator. ``'sequential'``: consecutive windows from a cursor that wraps around.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, *, sampling: str = "random",
                 seed: int = 0, rank: int = 0, world_size: int = 1, source: str = "corpus"):
        if len(tokens) < block_size + 1:
            raise DataError(source, 0, f"the training split has {len(tokens)} tokens, fewer than one context "
                                       f"of {block_size + 1}; add text or lower --model.block_size")
        self.tokens, self.T, self.B = tokens, block_size, batch_size
        self.sampling, self.rank, self.world = sampling, rank, world_size
        self.gen = torch.Generator().manual_seed(seed)
        self.cursor = 0

    def _window(self, start: int) -> np.ndarray:
        return np.asarray(self.tokens[start : start + self.T + 1], dtype=np.int64)

    def next(self, n_micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The ``n_micro`` micro-batches of this rank for one optimizer step, each (x, y) of (B, T)."""
        total = n_micro * self.world * self.B  # windows in the global batch
        if self.sampling == "random":
            starts = torch.randint(len(self.tokens) - self.T - 1 + 1, (total,), generator=self.gen).tolist()
        else:
            span = len(self.tokens) - self.T - 1
            starts = [(self.cursor + i * self.T) % max(1, span) for i in range(total)]
            self.cursor = (self.cursor + total * self.T) % max(1, span)
        # global order: micro-batch m of rank r takes windows [(m*world + r)*B, ... + B)
        out = []
        for m in range(n_micro):
            lo = (m * self.world + self.rank) * self.B
            w = torch.from_numpy(np.stack([self._window(s) for s in starts[lo : lo + self.B]]))  # (B, T+1)
            out.append((w[:, :-1], w[:, 1:]))
        return out

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        s = {"gen": self.gen.get_state(), "cursor": self.cursor}
        if hasattr(self.tokens, "locate") and len(self.tokens):
            s["shard"], s["offset"] = self.tokens.locate(self.cursor)  # where the cursor is, for people
        return s

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.cursor = s["cursor"]


class MixtureLoader:
    """Batches from several corpora: each window's source is drawn with probability proportional to its
    weight, then a uniform start inside that source (one generator, so every rank draws the same global
    batch). ``metrics()``: the realised training tokens per source so far (``tokens/<name>``)."""

    def __init__(self, sources: list[tuple[str, "np.ndarray", float]], block_size: int, batch_size: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        for name, tokens, _ in sources:
            if len(tokens) < block_size + 1:
                raise DataError(name, None, f"the training split has {len(tokens)} tokens, fewer than one context "
                                            f"of {block_size + 1}; add text or lower --model.block_size")
        self.names = [n for n, _, _ in sources]
        self.streams = [t for _, t, _ in sources]
        self.weights = torch.tensor([float(w) for _, _, w in sources], dtype=torch.float64)
        self.T, self.B, self.rank, self.world = block_size, batch_size, rank, world_size
        self.gen = torch.Generator().manual_seed(seed)
        self.counts = [0] * len(sources)

    def next(self, n_micro: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        total = n_micro * self.world * self.B
        src = torch.multinomial(self.weights, total, replacement=True, generator=self.gen).tolist()  # (total,)
        u = torch.rand(total, generator=self.gen, dtype=torch.float64).tolist()  # (total,) start within source
        picks = [(s, int(x * (len(self.streams[s]) - self.T))) for s, x in zip(src, u)]
        for s in src:
            self.counts[s] += self.T
        out = []
        for m in range(n_micro):
            lo = (m * self.world + self.rank) * self.B
            w = torch.from_numpy(np.stack([np.asarray(self.streams[s][a : a + self.T + 1], dtype=np.int64)
                                           for s, a in picks[lo : lo + self.B]]))  # (B, T+1)
            out.append((w[:, :-1], w[:, 1:]))
        return out

    def metrics(self) -> dict:
        return {f"tokens/{n}": c for n, c in zip(self.names, self.counts)}

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "counts": list(self.counts)}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.counts = list(s["counts"])


def val_windows(tokens: np.ndarray, block_size: int, batch_size: int, max_batches: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic non-overlapping windows covering the validation split (this rank's share)."""
    n = (len(tokens) - 1) // block_size
    if n == 0 and len(tokens) > 1:  # a split shorter than one context: one short window
        t = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        if rank == 0:
            yield t[None, :-1], t[None, 1:]
        return
    starts = list(range(0, n * block_size, block_size))
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    if max_batches:
        batches = batches[:max_batches]
    for b in batches[rank::world_size]:
        w = torch.from_numpy(np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in b]))
        yield w[:, :-1], w[:, 1:]
