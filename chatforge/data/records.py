"""Reading record files: JSON lines (plain or gzipped) and JSON arrays, with located errors.

Every reader in ``chatforge.data`` goes through this module, so they share one policy:

- A record is one line of a ``.jsonl`` / ``.jsonl.gz`` file (blank lines are not records), or one
  element of the top-level array of a ``.json`` / ``.json.gz`` file. Its location is
  ``file:line``, where for a JSON array ``line`` is the line on which the element starts.
- File-level problems always raise :class:`DataError`: a missing path, a folder without data
  files, an unsupported suffix, a file that is not UTF-8 (naming the line of the first bad byte),
  invalid JSON in a ``.json`` array (we cannot resynchronise after it).
- Record-level problems (a missing field, an unknown role, an empty response, a ``.jsonl`` line
  that is not valid JSON, ...) raise :class:`DataError` naming file, line and problem when
  ``strict=True`` (the default). With ``strict=False`` they are skipped and counted by reason in a
  :class:`SkipCounter`, which is attached to the returned list (``.skips``) and logged as a
  warning: never a silent drop.
- A few things are always a counted skip, never an error; each reader documents its own
  (e.g. a preference pair whose chosen and rejected answers are identical).
- A read that ends with no usable record at all raises :class:`DataError`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar, Union

from chatforge.errors import ChatforgeError

log = logging.getLogger("chatforge.data")

DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
"""File types the record readers accept."""

PathLike = Union[str, Path]
T = TypeVar("T")


class DataError(ChatforgeError, ValueError):
    """A problem with the input data the user can fix, located as ``file:line: problem``.

    Attributes: ``file`` (str), ``line`` (int, 1-based; None -- or 0 -- for whole-file problems,
    which print as ``file: problem``), ``problem`` (what is wrong, in words) and ``reason`` (a short
    category used to count skips).
    """

    def __init__(self, file: PathLike, line: Optional[int], problem: str, reason: Optional[str] = None):
        self.file = str(file)
        self.line = line or None
        self.problem = problem
        self.reason = reason or problem
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        super().__init__(f"{where}: {problem}")


class RecordProblem(Exception):
    """Raised by a record parser for a bad record; the reading loop adds file and line.

    ``problem`` is the full description, ``reason`` a short category for the skip count.
    """

    def __init__(self, problem: str, reason: Optional[str] = None):
        super().__init__(problem)
        self.problem = problem
        self.reason = reason or problem


class Skip(Exception):
    """Raised by a record parser for a record that is skipped (and counted) under every policy."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class SkipCounter:
    """Counts skipped records by reason and keeps a few example locations of each."""

    def __init__(self, max_examples: int = 3):
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.max_examples = max_examples
        self.seen = 0  # records read in total (usable + skipped), set by the reader

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(where)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return self.total > 0

    def as_dict(self) -> dict[str, int]:
        """JSON-ready counts by reason (for run provenance)."""
        return dict(self.counts.most_common())

    def summary(self) -> str:
        if not self:
            return "no records skipped"
        parts = [
            f"{reason}: {n} (e.g. {', '.join(self.examples[reason])})"
            for reason, n in self.counts.most_common()
        ]
        of = f" of {self.seen}" if self.seen else ""
        return f"skipped {self.total}{of} records; " + "; ".join(parts)


class DataList(list):
    """A plain list of parsed items with ``.skips`` (SkipCounter) and ``.files`` (paths read)."""

    skips: SkipCounter
    files: list[Path]


# ----------------------------------------------------------------------------- paths


def _has_suffix(path: Path, suffixes: Optional[Sequence[str]]) -> bool:
    return suffixes is None or any(path.name.endswith(s) for s in suffixes)


def expand_paths(paths: Union[PathLike, Iterable[PathLike]], suffixes: Optional[Sequence[str]] = DATA_SUFFIXES) -> list[Path]:
    """Files named by ``paths`` (files, or folders searched recursively), in order, deduplicated.

    Files inside a folder are sorted by path; hidden files are ignored. ``suffixes=None`` accepts
    any file. Raises DataError for a path that does not exist, a folder with no matching file,
    a file with an unsupported suffix, or an empty list of paths.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Path] = []
    for given in paths:
        p = Path(given)
        if not p.exists():
            raise DataError(given, None, "no such file or folder")
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not f.name.startswith(".") and _has_suffix(f, suffixes)
            )
            if not found:
                want = ", ".join(suffixes) if suffixes else "any"
                raise DataError(given, None, f"folder holds no data files ({want})")
            out.extend(found)
        elif _has_suffix(p, suffixes):
            out.append(p)
        else:
            raise DataError(given, None, f"unsupported file type; expected one of {', '.join(suffixes or ())}")
    if not out:
        raise DataError("(no paths)", None, "no data files given")
    unique, seen = [], set()
    for f in out:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append(f)
    return unique


def fingerprint(paths: Union[PathLike, Iterable[PathLike]], suffixes: Optional[Sequence[str]] = None) -> str:
    """sha256 (hex) over the names and bytes of the data files, for run provenance.

    Names are base names for files given directly and paths relative to the folder for files
    found in a folder, so moving the data elsewhere keeps the fingerprint.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    h = hashlib.sha256()
    for given in paths:
        root = Path(given)
        for f in expand_paths([root], suffixes):
            name = f.relative_to(root).as_posix() if root.is_dir() else f.name
            h.update(f"{name}\0{f.stat().st_size}\0".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- records


def _read_text(path: Path) -> str:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(path, None, f"cannot read file: {e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(path, line, f"not UTF-8 text ({e.reason} at byte {e.start}, column {column}); "
                        f"convert the file to UTF-8", "not UTF-8") from None


def _invalid_json(path: Path, e: json.JSONDecodeError, line: Optional[int] = None) -> DataError:
    return DataError(path, line or e.lineno, f"invalid JSON: {e.msg} (column {e.colno})", "invalid JSON")


_WS = re.compile(r"\s*")


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a top-level JSON array, each with the line on which it starts."""
    dec = json.JSONDecoder()
    line, counted_to = 1, 0  # line number at offset counted_to (counted incrementally)

    def line_at(i: int) -> int:
        nonlocal line, counted_to
        line += text.count("\n", counted_to, i)
        counted_to = i
        return line

    i = _WS.match(text, 0).end()
    if text[i : i + 1] != "[":
        if i == len(text):
            raise DataError(path, None, "empty file; a .json data file must hold a JSON array of records")
        raise DataError(path, line_at(i), "a .json data file must hold a JSON array of records "
                        "(use .jsonl for one record per line)", "not a JSON array")
    i = _WS.match(text, i + 1).end()
    if text[i : i + 1] == "]":
        i += 1
    else:
        while True:
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise _invalid_json(path, e) from None
            yield line_at(i), obj
            i = _WS.match(text, end).end()
            c = text[i : i + 1]
            if c == "]":
                i += 1
                break
            if c != ",":
                raise DataError(path, line_at(i), "invalid JSON: expected ',' or ']' after an array element",
                                "invalid JSON")
            i = _WS.match(text, i + 1).end()
    i = _WS.match(text, i).end()
    if i != len(text):
        raise DataError(path, line_at(i), "invalid JSON: extra data after the array", "invalid JSON")


def iter_records(path: PathLike, on_invalid_line: Optional[Callable[[DataError], None]] = None
                 ) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_no, record)`` for every record of one data file.

    ``record`` is whatever the JSON holds: usually a dict, or a str for plain-string lines.
    ``.jsonl``/``.jsonl.gz``: one record per non-blank line, ``line_no`` is that line.
    ``.json``/``.json.gz``: a JSON array; ``line_no`` is the line where the element starts.
    Invalid JSON raises DataError with its line; in a ``.jsonl`` file, a line that is not valid
    JSON is instead passed to ``on_invalid_line`` (if given) and skipped.
    """
    path = Path(path)
    text = _read_text(path)
    if path.name.endswith((".json", ".json.gz")):
        yield from _iter_json_array(path, text)
        return
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            err = _invalid_json(path, e, n)
            if on_invalid_line is None:
                raise err from None
            on_invalid_line(err)
            continue
        yield n, rec


def read_records(
    paths: Union[PathLike, Iterable[PathLike]],
    parse: Callable[[Any, str], list[T]],
    *,
    strict: bool = True,
    what: str = "records",
) -> DataList:
    """Parse every record of ``paths`` with ``parse(record, "file:line") -> list of items``.

    ``parse`` raises RecordProblem for a bad record (an error if ``strict``, else a counted skip)
    and Skip for a record skipped under every policy. A ``.jsonl`` line that is not valid JSON is
    an error if ``strict``, else a counted skip too. Returns a DataList with ``.skips`` and
    ``.files``; skips are logged as one warning. No usable item at all raises DataError.
    """
    files = expand_paths(paths, DATA_SUFFIXES)
    out = DataList()
    skips = SkipCounter()

    def skip_invalid(e: DataError) -> None:  # a .jsonl line that is not JSON, with strict=False
        skips.seen += 1
        skips.add(e.reason, f"{e.file}:{e.line}")

    for f in files:
        for line, rec in iter_records(f, None if strict else skip_invalid):
            skips.seen += 1
            where = f"{f}:{line}"
            try:
                items = parse(rec, where)
            except Skip as s:
                skips.add(s.reason, where)
                continue
            except RecordProblem as p:
                if strict:
                    raise DataError(f, line, p.problem, p.reason) from None
                skips.add(p.reason, where)
                continue
            out.extend(items)
    out.skips, out.files = skips, files
    if not out:
        names = ", ".join(str(f) for f in files)
        raise DataError(names, None, f"no usable {what} ({skips.seen} records read; {skips.summary()})", "empty")
    if skips:
        log.warning("%s: %s", what, skips.summary())
    return out


# ----------------------------------------------------------------------------- split


def split_train_val(items: Sequence[T], val_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Deterministic random split: ``round(len * val_fraction)`` items (at least 1 when the
    fraction is positive) go to val. Both parts keep the original order of the items."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(items)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val >= n and n_val > 0:
        raise ValueError(f"cannot hold out {n_val} of {n} items and keep a training set")
    val_idx = set(random.Random(seed).sample(range(n), n_val))
    train = [x for i, x in enumerate(items) if i not in val_idx]
    val = [x for i, x in enumerate(items) if i in val_idx]
    return train, val
