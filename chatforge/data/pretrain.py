"""Pretraining text -> memory-mapped token shards -> batches.

Documents: a ``.txt`` file is one continuous document (never split at blank lines) unless it
holds ``<|endoftext|>`` separators; a ``.jsonl`` file holds one document per line in a ``text``
field. Every document is encoded as ``<|endoftext|> + tokens`` into one stream, whose last
``val_fraction`` becomes the validation split (as nanoGPT splits Tiny Shakespeare). The
streams are written once as ``train.bin``/``val.bin`` (uint16 or uint32) beside a
``meta.json`` holding the fingerprint of the files, tokenizer and split; they are reused
while that fingerprint is unchanged.

Batches are drawn for the whole world and then sliced by rank, so a run on N processes sees
the same global batch as a run on one process with N times the accumulation. The loader's
position (a generator state or a cursor) is saved in checkpoints.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from chatforge.checkpoint import atomic_write_json
from chatforge.data.records import DataError

EOT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".jsonl")
CHUNK_CHARS = 1 << 20  # long documents are encoded in ~1 MB pieces cut after a newline


def corpus_files(paths: list[str]) -> list[Path]:
    """Files named directly, plus .txt/.jsonl files inside named folders (sorted)."""
    if not paths:
        raise DataError("<config>", 0, "no pretraining data given; pass --data.path=FILE_OR_FOLDER")
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES and f.is_file())
            if not found:
                raise DataError(str(p), 0, "folder holds no .txt or .jsonl files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(str(p), 0, "no such file or folder")
    return files


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(str(path), line, f"not valid UTF-8 (byte offset {e.start}); convert the file to UTF-8") from None


def iter_documents(files: list[Path]) -> Iterator[str]:
    """Yield the documents of the corpus in order."""
    for path in files:
        if path.suffix == ".jsonl":
            text = _read_text(path)
            for i, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(str(path), i, f"invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(str(path), i, "record has no string field 'text'")
                if rec["text"]:
                    yield rec["text"]
        else:
            text = _read_text(path)
            for doc in text.split(EOT) if EOT in text else [text]:
                if doc.strip():
                    yield doc


def _pieces(doc: str) -> Iterator[str]:
    """Cut a long document after newlines into pieces of about CHUNK_CHARS."""
    start = 0
    while start < len(doc):
        end = start + CHUNK_CHARS
        if end < len(doc):
            nl = doc.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        yield doc[start:end]
        start = end


def fingerprint_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.resolve()).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


@dataclass
class TokenData:
    """Memory-mapped token streams of a corpus."""

    train: np.ndarray
    """Training tokens, uint16/uint32 memmap."""
    val: np.ndarray
    """Validation tokens."""
    meta: dict
    """Counts, bytes and fingerprints (written to meta.json)."""

    @property
    def val_bytes_per_token(self) -> float:
        return self.meta["val_bytes"] / max(1, self.meta["val_tokens"])


def build_token_data(paths: list[str], tok, cache_dir: Path, val_fraction: float, progress: bool = True) -> TokenData:
    """Tokenize a corpus once into ``cache_dir`` (reused while files, tokenizer and split are unchanged)."""
    files = corpus_files(paths)
    cache_dir = Path(cache_dir)
    fp = hashlib.sha256(f"{fingerprint_files(files)}|{tok.fingerprint()}|{val_fraction}".encode()).hexdigest()[:16]
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp:
            return _open(cache_dir, meta)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    chunks: list[np.ndarray] = []
    n_docs = 0
    n_bytes = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, total=sum(f.stat().st_size for f in files))
    for doc in iter_documents(files):
        n_docs += 1
        ids = [tok.bos_id]
        for piece in _pieces(doc):
            ids += tok.encode(piece)
        chunks.append(np.asarray(ids, dtype=dtype))
        b = len(doc.encode("utf-8"))
        n_bytes += b
        if bar is not None:
            bar.update(b)
    if bar is not None:
        bar.close()
    if n_docs == 0:
        raise DataError(str(files[0]), 0, "the corpus is empty (no non-blank documents)")
    stream = np.concatenate(chunks)
    n_val = int(len(stream) * val_fraction)
    train, val = stream[: len(stream) - n_val], stream[len(stream) - n_val :]
    val_bytes = len(tok.decode(val.tolist()).encode("utf-8")) if n_val else 0
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, arr in (("train", train), ("val", val)):
        tmp = cache_dir / f".{name}.bin.tmp"
        arr.tofile(tmp)
        tmp.replace(cache_dir / f"{name}.bin")
    meta = {
        "fingerprint": fp,
        "files": [str(f) for f in files],
        "files_fingerprint": fingerprint_files(files),
        "tokenizer_fingerprint": tok.fingerprint(),
        "dtype": np.dtype(dtype).name,
        "documents": n_docs,
        "bytes": n_bytes,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "val_bytes": val_bytes,
    }
    atomic_write_json(meta_path, meta)
    return _open(cache_dir, meta)


def _open(cache_dir: Path, meta: dict) -> TokenData:
    dtype = np.dtype(meta["dtype"])

    def mm(name: str, n: int) -> np.ndarray:
        return np.memmap(cache_dir / f"{name}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)

    return TokenData(mm("train", meta["train_tokens"]), mm("val", meta["val_tokens"]), meta)


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

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "cursor": self.cursor}

    def load_state_dict(self, s: dict) -> None:
        self.gen.set_state(s["gen"])
        self.cursor = s["cursor"]


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
