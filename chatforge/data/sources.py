"""Pretraining documents read as a stream, from files of any size.

Formats (by file name): ``.txt`` (one continuous document, never split at blank lines, unless it holds
``<|endoftext|>`` separators; a file of another name given directly is read as text too), ``.jsonl`` (one document per line in a ``text`` field), either of them
compressed as ``.gz`` or ``.zst``, and ``.parquet`` (a ``text`` column). A path may name a file, a folder
(every supported file inside, sorted) or a glob (``data/*.parquet``).

Nothing is read whole: text is decoded in blocks, and a document is handed on as *pieces* of about
``CHUNK_CHARS`` characters cut after a newline, so a multi-gigabyte document costs a few MB of memory.
Bad input raises :class:`DataError` naming the file and the line (row, for parquet).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from chatforge.data.records import DataError

EOT = "<|endoftext|>"
CHUNK_CHARS = 1 << 20  # long documents are encoded in ~1 MB pieces cut after a newline
READ_BYTES = 1 << 20  # binary read size
TEXT_FIELD = "text"
SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz", ".txt.zst", ".jsonl.zst", ".parquet")


@dataclass(frozen=True)
class Piece:
    """A piece of a document: consecutive pieces of one ``doc`` concatenate to the document."""

    doc: int
    """Index of the document in the corpus, in reading order (0-based)."""
    text: str
    first: bool
    """The document's first piece (the data layer puts the BOS token before it)."""
    file: int
    """Index of the file (in the corpus' file list) the document comes from."""
    at: int = 0
    """Bytes of that file (on disk, compressed or not) read so far: for progress bars."""


def _supported(p: Path) -> bool:
    return any(p.name.endswith(s) for s in SUFFIXES)


def corpus_files(paths: list[str]) -> list[Path]:
    """Files named directly, every supported file inside named folders (sorted), and glob matches (sorted)."""
    if not paths:
        raise DataError("<config>", None, "no pretraining data given; pass --data.path=FILE_OR_FOLDER")
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if any(c in str(raw) for c in "*?[") and not p.exists():
            found = sorted(Path(f) for f in glob.glob(str(raw), recursive=True) if Path(f).is_file())
            if not found:
                raise DataError(str(raw), None, "the pattern matches no files")
            files += found
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if _supported(f) and f.is_file())
            if not found:
                raise DataError(str(p), None, f"folder holds no {', '.join(SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(str(p), None, "no such file or folder")
    return files


def _compression(path: Path) -> Optional[str]:
    return {".gz": "gzip", ".zst": "zstd"}.get(path.suffix)


class _Binary:
    """A file opened for binary reading, decompressed by its suffix; ``at`` = on-disk bytes read so far."""

    def __init__(self, path: Path):
        self.raw = open(path, "rb")
        kind = _compression(path)
        if kind == "gzip":
            self.fh = gzip.GzipFile(fileobj=self.raw, mode="rb")
        elif kind == "zstd":
            import zstandard

            self.fh = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(self.raw, closefd=False))
        else:
            self.fh = self.raw

    @property
    def at(self) -> int:
        return self.raw.tell()

    def __enter__(self) -> "_Binary":
        return self

    def __exit__(self, *exc) -> None:
        self.fh.close()
        self.raw.close()


def _corrupt(path: Path, line: int, e: Exception) -> DataError:
    kind = _compression(path) or "file"
    return DataError(str(path), line, f"corrupt or truncated {kind} stream ({type(e).__name__}: {e}); "
                                      "re-download or re-compress the file")


def _read_errors() -> tuple:
    errs: tuple = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errs += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errs


def _not_utf8(path: Path, line: int, offset: int) -> DataError:
    return DataError(str(path), line, f"not valid UTF-8 (byte offset {offset}); convert the file to UTF-8")


def cut_pieces(doc: str) -> Iterator[str]:
    """Cut a document after newlines into pieces of about CHUNK_CHARS (one piece when shorter)."""
    start = 0
    while start < len(doc):
        end = _cut(doc, start) if len(doc) - start > CHUNK_CHARS else len(doc)
        yield doc[start:end]
        start = end


def _cut(text: str, start: int) -> int:
    """End of the piece that starts at ``start`` when more than CHUNK_CHARS characters follow."""
    end = start + CHUNK_CHARS
    nl = text.rfind("\n", start, end)
    return nl + 1 if nl > start else end


def _text_blocks(path: Path) -> Iterator[tuple[str, int]]:
    """The decoded text of a .txt file in blocks, with the on-disk bytes read; errors name the line."""
    dec = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0  # line and byte offset where the block starts
    errors = _read_errors()
    with _Binary(path) as f:
        while True:
            try:
                raw = f.fh.read(READ_BYTES)
            except errors as e:
                raise _corrupt(path, line, e) from None
            held = dec.getstate()[0]  # bytes of a character cut by the previous block
            try:
                text = dec.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                data = held + raw
                raise _not_utf8(path, line + data[: e.start].count(b"\n"), offset - len(held) + e.start) from None
            line += raw.count(b"\n")
            offset += len(raw)
            if text:
                yield text, f.at
            if not raw:
                return


def _txt_pieces(path: Path) -> Iterator[tuple[str, bool, int]]:
    """(piece, first_of_document, on-disk bytes read) for the non-blank documents of a .txt file (split at <|endoftext|>)."""
    held: list[str] = []  # the current document's pieces while they are all blank
    started = False  # has the current document yielded a piece?

    at = 0

    def push(piece: str) -> list[tuple[str, bool, int]]:
        nonlocal started
        if started:
            return [(piece, False, at)]
        held.append(piece)
        if not piece.strip():
            return []
        out = [(p, i == 0, at) for i, p in enumerate(held)]
        held.clear()
        started = True
        return out

    keep = len(EOT) - 1  # a separator may straddle two blocks
    buf = ""
    for block, at in _text_blocks(path):
        buf += block
        pos = 0
        while (i := buf.find(EOT, pos)) >= 0:  # documents that end in this block
            for piece in cut_pieces(buf[pos:i]):
                yield from push(piece)
            held.clear()
            started = False
            pos = i + len(EOT)
        buf = buf[pos:]
        while len(buf) - keep > CHUNK_CHARS:  # a long document: hand on its pieces as they come
            end = _cut(buf, 0)
            yield from push(buf[:end])
            buf = buf[end:]
    for piece in cut_pieces(buf):
        yield from push(piece)


def _jsonl_documents(path: Path, field: str) -> Iterator[tuple[str, int]]:
    errors = _read_errors()
    with _Binary(path) as f:
        i = 0
        while True:
            i += 1
            try:
                raw = f.fh.readline()
            except errors as e:
                raise _corrupt(path, i, e) from None
            if not raw:
                return
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _not_utf8(path, i, e.start) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(str(path), i, f"invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
                raise DataError(str(path), i, f"record has no string field '{field}'")
            if rec[field]:
                yield rec[field], f.at


def _parquet_documents(path: Path, field: str) -> Iterator[tuple[str, int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError for a file that is not parquet
        raise DataError(str(path), None, f"not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise DataError(str(path), None, f"parquet file has no column '{field}' (columns: {', '.join(names)})")
    row = 0
    size, n_rows = path.stat().st_size, max(1, pf.metadata.num_rows)
    try:
        batches = pf.iter_batches(columns=[field], batch_size=1024)
        for batch in batches:
            for value in batch.column(0).to_pylist():
                row += 1
                if not isinstance(value, str):
                    raise DataError(str(path), row, f"row {row}: column '{field}' is {type(value).__name__}, not a string")
                if value:
                    yield value, size * row // n_rows
    except DataError:
        raise
    except Exception as e:
        raise DataError(str(path), row + 1, f"row {row + 1}: unreadable parquet data ({e})") from None


def _file_pieces(path: Path, field: str) -> Iterator[tuple[str, bool, int]]:
    """(piece, first_of_document, on-disk bytes read) of every document of one file."""
    name = path.name[: -len(path.suffix)] if _compression(path) else path.name
    if name.endswith(".parquet"):
        docs = _parquet_documents(path, field)
    elif name.endswith(".jsonl"):
        docs = _jsonl_documents(path, field)
    else:  # .txt, and any other file named directly, is text
        yield from _txt_pieces(path)
        return
    for doc, at in docs:
        for j, p in enumerate(cut_pieces(doc)):
            yield p, j == 0, at


def iter_pieces(files: list[Path], field: str = TEXT_FIELD,
                max_chars_per_file: Optional[list[float]] = None) -> Iterator[Piece]:
    """The pieces of every document of the corpus, in order.

    ``max_chars_per_file``: stop reading a file at the first document that starts after that many
    characters were read from it (bounded samples).
    """
    doc = -1
    for fi, path in enumerate(files):
        seen = 0
        limit = max_chars_per_file[fi] if max_chars_per_file else None
        for text, first, at in _file_pieces(path, field):
            if first:
                if limit is not None and seen >= limit:
                    break
                doc += 1
            yield Piece(doc, text, first, fi, at)
            seen += len(text)


def iter_documents(files: list[Path], field: str = TEXT_FIELD) -> Iterator[str]:
    """Whole documents of the corpus, in order (small corpora and tests; large ones use iter_pieces)."""
    parts: list[str] = []
    current = None
    for p in iter_pieces(files, field):
        if p.first and parts:
            yield "".join(parts)
            parts = []
        parts.append(p.text)
        current = p
    if current is not None:
        yield "".join(parts)


def tokenizer_sample(files: list[Path], max_chars: int, field: str = TEXT_FIELD) -> Iterator[str]:
    """A bounded, deterministic sample of the corpus for BPE training, as text pieces.

    Each file contributes its first documents, up to a share of ``max_chars`` in proportion to its size
    on disk (the document crossing the share is finished); a corpus smaller than ``max_chars`` is
    read whole.
    """
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    limits = None if total <= max_chars else [max_chars * s / total for s in sizes]
    for p in iter_pieces(files, field, limits):
        yield p.text
