"""Streaming, parallel tokenization of a corpus into fixed-size token shards in a shared cache.

A corpus (its files' contents, the tokenizer and the validation rule) maps to one cache entry,
``<cache>/tokens/<key>/``, so every run and stage that uses the same corpus reuses its tokens::

    index.json            written last: dtype, files, split, per stream its shards
                          (file, tokens, documents, sources, sha256) and totals
    train_00000.bin ...   raw uint16/uint32 token ids, ``shard_tokens`` each (the last one shorter)
    val_00000.bin ...     the validation documents' stream (rule 'documents' or a separate val_path)
    progress.json         while tokenizing: the finished shards and where to resume

Every document is encoded as ``<|endoftext|> + tokens`` (long documents piece by piece, see
sources.py); documents run across shard boundaries, so the shards of a stream concatenate to exactly
the stream of encoding each document alone. Text is read in one stream, encoded in batches by the
`tokenizers` library on every core (its Rust threads run while Python reads the next batch and writes
the previous one), and appended to the open shard on disk: memory stays bounded whatever the corpus
size. An interrupted run resumes after the last finished shard (documents before it are read again,
not encoded again), giving byte-identical shards.

Validation rules (``split``): 'documents' -- document ``i`` is held out when ``floor((i+1)*f)`` exceeds
``floor(i*f)`` (an exact, evenly spread share ``f`` of whole documents, whatever the shards; when no
document falls into it, e.g. a corpus of one long document, the tail rule applies instead); 'tail' --
the last ``f`` of the token stream (nanoGPT's Tiny Shakespeare split); 'files' -- the documents of the
separate validation files.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from chatforge.checkpoint import atomic_write_json
from chatforge.data.records import DataError
from chatforge.data.sources import Piece, iter_pieces

FORMAT = 1  # bump when the layout or the encoding rule changes
DEFAULT_SHARD_TOKENS = 100_000_000
STREAMS = ("train", "val")


# ----------------------------------------------------------------------------------------------------
# where the cache lives, and what a corpus is called in it


def cache_root(configured: Optional[str] = None) -> Path:
    """The token cache folder: the configured one, else $CHATFORGE_CACHE, else the user's cache dir."""
    if configured:
        return Path(configured).expanduser()
    env = os.environ.get("CHATFORGE_CACHE")
    if env:
        return Path(env).expanduser() / "tokens"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "chatforge" / "tokens"


def file_fingerprints(files: list[Path], root: Path) -> list[str]:
    """sha256 of each file's bytes, remembered under ``root`` by (path, size, mtime, inode) so an
    unchanged file is hashed once, not at every run."""
    memo_path = root / "file_hashes.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    out, changed = [], False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        if key not in memo:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
            memo[key] = h.hexdigest()
            changed = True
        out.append(memo[key])
    if changed:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(memo_path, memo)
    return out


def corpus_key(hashes: list[str], n_val_files: int, tok_fingerprint: str, split: str, val_fraction: float,
               shard_tokens: int) -> str:
    """The cache entry's name: files' contents (in order), tokenizer, validation rule, shard size."""
    parts = [f"format={FORMAT}", f"tok={tok_fingerprint}", f"split={split}", f"f={val_fraction!r}",
             f"shard={shard_tokens}", f"val_files={n_val_files}", *hashes]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------------
# reading the shards


class TokenStream:
    """A read-only view of tokens stored across shard files, indexed as one array.

    ``len(s)`` and ``s[a:b]`` (a numpy array, concatenated across shard boundaries) are all the loader
    uses, so batches over shards equal batches over one array. Memory maps open on first use.
    """

    def __init__(self, paths: list[Path], sizes: list[int], dtype, start: int = 0, stop: Optional[int] = None):
        self.paths, self.sizes, self.dtype = list(paths), list(sizes), np.dtype(dtype)
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)  # (n_shards+1,)
        total = int(self.offsets[-1])
        self.start, self.stop = start, total if stop is None else stop
        self._maps: dict[int, np.ndarray] = {}

    def view(self, start: int, stop: int) -> "TokenStream":
        """Tokens [start, stop) of this view as a new view (no copy)."""
        return TokenStream(self.paths, self.sizes, self.dtype, self.start + start, self.start + stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def _map(self, i: int) -> np.ndarray:
        if i not in self._maps:
            self._maps[i] = np.memmap(self.paths[i], dtype=self.dtype, mode="r", shape=(self.sizes[i],))
        return self._maps[i]

    def locate(self, pos: int) -> tuple[int, int]:
        """(shard, offset in shard) of token ``pos`` of this view."""
        g = self.start + pos
        i = int(np.searchsorted(self.offsets, g, side="right")) - 1
        return i, g - int(self.offsets[i])

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only")
        a, b, _ = key.indices(len(self))
        if b <= a:
            return np.zeros(0, self.dtype)
        a, b = self.start + a, self.start + b
        i = int(np.searchsorted(self.offsets, a, side="right")) - 1
        parts = []
        while a < b:
            lo = a - int(self.offsets[i])
            take = min(b - a, self.sizes[i] - lo)
            parts.append(self._map(i)[lo : lo + take])
            a += take
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def __array__(self, dtype=None, copy=None):
        arr = self[0 : len(self)]
        return arr if dtype is None else arr.astype(dtype)


def open_streams(entry: Path, index: dict) -> tuple[TokenStream, TokenStream]:
    """(train, val) views of a finished cache entry, the tail rule applied."""
    dtype = np.dtype(index["dtype"])

    def stream(name: str) -> TokenStream:
        shards = index["streams"][name]["shards"]
        return TokenStream([entry / s["file"] for s in shards], [s["tokens"] for s in shards], dtype)

    train, val = stream("train"), stream("val")
    if index["tail_tokens"]:
        n = len(train)
        train, val = train.view(0, n - index["tail_tokens"]), train.view(n - index["tail_tokens"], n)
    return train, val


# ----------------------------------------------------------------------------------------------------
# writing the shards


class _ShardWriter:
    """Appends one stream's tokens to fixed-size shard files; records where to resume after each."""

    def __init__(self, entry: Path, name: str, dtype, shard_tokens: int, state: dict, on_shard):
        self.entry, self.name, self.dtype, self.cap = entry, name, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = state["shards"]  # finished shards (from progress.json when resuming)
        self.total = sum(s["tokens"] for s in self.shards)  # tokens in finished shards
        self.resume = state.get("resume", {"doc": 0, "skip": 0, "file": None})  # first doc to encode, tokens to drop
        # (document, global start, file) of the document being written
        self.cur = (self.resume["doc"], self.total - self.resume["skip"], self.resume["file"])
        self.on_shard = on_shard
        self._open()

    def _open(self) -> None:
        self.fill = 0
        self.tmp = self.entry / f".{self.name}_{len(self.shards):05d}.bin.tmp"
        self.fh = open(self.tmp, "wb")
        self.hash = hashlib.sha256()
        self.docs = 0
        self.sources: set[int] = set() if self.cur[2] is None else {self.cur[2]}  # files with tokens here

    def add(self, arr: np.ndarray, starts: list[tuple[int, int, int]]) -> None:
        """Append ``arr``; ``starts``: (offset in arr, document, file) of each document starting in it."""
        a, j = 0, 0
        while True:
            take = min(len(arr) - a, self.cap - self.fill)
            while j < len(starts) and starts[j][0] < a + take:  # documents starting in this chunk
                off, doc, f = starts[j]
                self.cur = (doc, self.total + self.fill + off - a, f)
                self.docs += 1
                self.sources.add(f)
                j += 1
            chunk = np.ascontiguousarray(arr[a : a + take])
            self.fh.write(chunk.data)
            self.hash.update(chunk.data)
            self.fill += take
            a += take
            if self.fill == self.cap:
                self._finish()
            if a >= len(arr):
                return

    def _finish(self) -> None:
        self.fh.close()
        if self.fill == 0:
            self.tmp.unlink()
            return
        name = f"{self.name}_{len(self.shards):05d}.bin"
        self.tmp.replace(self.entry / name)
        self.total += self.fill
        doc, start, f = self.cur
        self.shards.append({"file": name, "tokens": self.fill, "documents": self.docs,
                            "sources": sorted(self.sources), "sha256": self.hash.hexdigest()})
        self.resume = {"doc": doc, "skip": self.total - start, "file": f}  # re-encode `doc`, drop what is written
        self.on_shard()
        self._open()

    def close(self) -> None:
        self._finish()
        self.fh.close()
        if self.tmp.exists():
            self.tmp.unlink()


def _batches(pieces: Iterator[Piece], batch_chars: int) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    n = 0
    for p in pieces:
        batch.append(p)
        n += len(p.text)
        if n >= batch_chars:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def _val_rule(split: str, val_fraction: float, n_train_files: int):
    """doc, file -> True when the document belongs to the validation stream."""
    if split == "files":
        return lambda doc, f: f >= n_train_files
    if split == "documents" and val_fraction > 0:
        q = Fraction(str(val_fraction))
        return lambda doc, f: ((doc + 1) * q.numerator) // q.denominator > (doc * q.numerator) // q.denominator
    return lambda doc, f: False


def build_shards(files: list[Path], tok, *, cache: Path, split: str = "documents", val_fraction: float = 0.1,
                 val_files: Optional[list[Path]] = None, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 batch_chars: int = 0, progress: bool = True, field: str = "text") -> tuple[Path, dict]:
    """Tokenize ``files`` (and ``val_files``) into a cache entry under ``cache``, or reuse the finished
    one; returns (entry folder, index). Safe against concurrent builders (a file lock)."""
    if split not in ("documents", "tail"):
        raise ValueError(f"unknown validation split {split!r}: expected 'documents' or 'tail'")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    val_files = list(val_files or [])
    if val_files:
        split = "files"
    all_files = list(files) + val_files
    cache = Path(cache)
    hashes = file_fingerprints(all_files, cache)
    key = corpus_key(hashes, len(val_files), tok.fingerprint(), split, val_fraction, shard_tokens)
    entry = cache / key
    entry.mkdir(parents=True, exist_ok=True)
    with _Lock(entry / ".lock"):
        index_path = entry / "index.json"
        if index_path.is_file():
            return entry, json.loads(index_path.read_text())
        index = _tokenize(all_files, hashes, len(files), tok, entry, split, val_fraction, shard_tokens,
                          batch_chars, progress, field)
        index["key"] = key
        atomic_write_json(index_path, index)
        (entry / "progress.json").unlink(missing_ok=True)
    return entry, index


def _tokenize(files, hashes, n_train_files, tok, entry: Path, split, val_fraction, shard_tokens, batch_chars,
              progress, field) -> dict:
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    progress_path = entry / "progress.json"
    state = json.loads(progress_path.read_text()) if progress_path.is_file() else {}
    if state.get("dtype") not in (None, np.dtype(dtype).name):
        state = {}
    streams = state.get("streams", {s: {"shards": []} for s in STREAMS})

    def save_progress() -> None:
        atomic_write_json(progress_path, {"dtype": np.dtype(dtype).name, "streams": {
            s: {"shards": w.shards, "resume": w.resume} for s, w in writers.items()}})

    writers = {s: _ShardWriter(entry, s, dtype, shard_tokens, streams[s], save_progress) for s in STREAMS}
    is_val = _val_rule(split, val_fraction, n_train_files)
    bos = tok.bos_id
    counts = {s: {"documents": 0, "bytes": 0} for s in STREAMS}
    start = {s: writers[s].resume["doc"] for s in STREAMS}  # documents before these are in finished shards
    drop = {s: writers[s].resume["skip"] for s in STREAMS}  # tokens of that document already written
    sizes = [f.stat().st_size for f in files]
    done_before = [0] + list(np.cumsum(sizes))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="tokenizing", unit="B", unit_scale=True, unit_divisor=1024, total=sum(sizes),
                   dynamic_ncols=True, smoothing=0.1)
    shown = 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    batch_chars = batch_chars or min(16 << 20, max(4 << 20, cores << 20))  # ~1 MB per core, bounded

    def wanted(batch: list[Piece]) -> list[tuple[Piece, str]]:
        """Count every piece; keep (piece, stream) of those whose tokens are not in finished shards."""
        keep = []
        for p in batch:
            s = "val" if is_val(p.doc, p.file) else "train"
            if p.first:
                counts[s]["documents"] += 1
            counts[s]["bytes"] += len(p.text.encode("utf-8"))
            if p.doc >= start[s]:
                keep.append((p, s))
        return keep

    def encode(batch: list[tuple[Piece, str]]):
        return batch, tok.encode_batch([p.text for p, _ in batch]) if batch else []

    def write(batch: list[tuple[Piece, str]], ids: list[list[int]]) -> None:
        for s in STREAMS:
            flat: list[int] = []
            starts: list[tuple[int, int, int]] = []
            for (p, ps), piece_ids in zip(batch, ids):
                if ps != s:
                    continue
                toks = [bos, *piece_ids] if p.first else piece_ids
                if drop[s] and p.doc == start[s]:  # resuming inside this document
                    cut = min(drop[s], len(toks))
                    drop[s] -= cut
                    toks = toks[cut:]
                elif p.first:
                    starts.append((len(flat), p.doc, p.file))
                flat.extend(toks)
            if flat or starts:
                writers[s].add(np.array(flat, dtype=dtype), starts)

    t0 = time.time()
    pieces = iter_pieces(files, field)
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in _batches(pieces, batch_chars):
            keep = wanted(batch)
            nxt = pool.submit(encode, keep)  # encoded in Rust threads while this thread writes the last batch
            if pending is not None:
                write(*pending.result())
            pending = nxt
            if bar is not None:
                last = batch[-1]
                pos = int(done_before[last.file]) + last.at
                bar.update(pos - shown)
                shown = pos
        if pending is not None:
            write(*pending.result())
    for w in writers.values():
        w.close()
    if bar is not None:
        bar.update(int(done_before[-1]) - shown)
        bar.close()
    n_docs = counts["train"]["documents"] + counts["val"]["documents"]
    if n_docs == 0:
        raise DataError(str(files[0]), None, "the corpus is empty (no non-blank documents)")
    tail = 0
    if split == "tail" or (split == "documents" and counts["val"]["documents"] == 0):
        tail = int(writers["train"].total * val_fraction)  # no whole document held out: the tail rule
    index = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "tokenizer_fingerprint": tok.fingerprint(),
        "files": [{"path": str(f), "sha256": h, "bytes": s} for f, h, s in zip(files, hashes, sizes)],
        "train_files": n_train_files,
        "split": split if not tail or split == "tail" else "tail (a single document)",
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
        "tail_tokens": tail,
        "documents": n_docs,
        "bytes": counts["train"]["bytes"] + counts["val"]["bytes"],
        "tokenize_s": round(time.time() - t0, 3),
        "streams": {s: {"tokens": writers[s].total, **counts[s], "shards": writers[s].shards} for s in STREAMS},
    }
    train, val = open_streams(entry, index)
    index["train_tokens"], index["val_tokens"] = len(train), len(val)
    index["val_bytes"] = _decoded_bytes(val, tok)
    return index


def _decoded_bytes(stream: TokenStream, tok, chunk: int = 1 << 20) -> int:
    """UTF-8 bytes of the decoded tokens (for bits per byte), decoded in chunks of ``chunk`` tokens."""
    n = 0
    for a in range(0, len(stream), chunk):
        n += len(tok.decode(stream[a : a + chunk].tolist()).encode("utf-8"))
    return n


class _Lock:
    """An exclusive advisory lock on a file (POSIX flock); a no-op where flock is unavailable."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self.fh.close()  # closing releases the lock
