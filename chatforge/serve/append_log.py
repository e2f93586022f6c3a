"""The label store's file machinery: an append-only JSON-lines file of validated records with distinct keys
(:class:`AppendLog`: thread lock + ``flock``, one ``write`` per line, fsync, repair of an interrupted last
line) and the reading of such a file (:func:`read_lines`: an unfinished last line is skipped with a warning,
any other bad line is a DataError naming file and line)."""

from __future__ import annotations

import json
import logging
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional

from chatforge.data.records import DataError, PathLike, RecordProblem

try:  # POSIX: an advisory lock shared by every process that appends to the same file
    import fcntl
except ImportError:  # pragma: no cover - Windows: the thread lock alone
    fcntl = None

log = logging.getLogger("chatforge.serve")


def read_lines(path: Path, check: Callable[[Any], dict]) -> tuple[list[dict], int]:
    """Validated records of a store file and the byte length of its whole lines.

    The last line without a newline is an unfinished write (a crash): skipped with a warning.
    Anything else wrong raises DataError(file, line, problem)."""
    data = path.read_bytes() if path.exists() else b""
    end = data.rfind(b"\n") + 1  # bytes of whole lines
    if end < len(data):
        log.warning("%s: ignoring an unfinished last line (%d bytes, an interrupted write)", path, len(data) - end)
    return _parse_lines(path, data[:end], 1, check), end


def _parse_lines(path: Path, data: bytes, first_line: int, check: Callable[[Any], dict]) -> list[dict]:
    out = []
    for n, raw in enumerate(data.split(b"\n")[:-1], first_line):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(path, n, "not UTF-8 text", "not UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(path, n, f"invalid JSON: {e.msg} (column {e.colno})", "invalid JSON") from None
        try:
            out.append(check(rec))
        except RecordProblem as p:
            raise DataError(path, n, p.problem, p.reason) from None
    return out


class AppendLog:
    """One append-only JSON-lines file of validated records with distinct keys.

    ``append(record)`` writes the record as one line unless a record with the same key is already
    in the file (returns False then). Safe across threads and processes: each append takes a thread
    lock and an exclusive ``flock``, first reads what other writers appended since, then writes the
    whole line with one ``write``, flushes and fsyncs.
    """

    def __init__(self, path: PathLike, check: Callable[[Any], dict], key: Callable[[dict], str],
                 index: Optional[Callable[[dict], str]] = None):
        self.path = Path(path)
        self.check, self.key, self._index = check, key, index
        self.index: set = set()
        """``index(record)`` of every record (e.g. the labelled prompt ids), when ``index`` is given."""
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        if new:
            _fsync_dir(self.path.parent)
        with self._lock, self._flocked():
            self._repair_tail()
            records, self._offset = read_lines(self.path, check)
            self._line = 1 + _read_bytes(self._fd, 0, self._offset).count(b"\n")
            self.keys: set = set()
            self.count = 0
            for r in records:
                self._add(r)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    @contextmanager
    def _flocked(self):
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _repair_tail(self) -> None:
        """An unfinished last line (an interrupted write): completed with its newline when it is a
        whole valid record, else moved to ``<file>.torn`` and cut off, so the next append starts a
        fresh line."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return
        data = _read_bytes(self._fd, 0, size)
        end = data.rfind(b"\n") + 1
        if end == size:
            return
        tail = data[end:]
        try:
            self.check(json.loads(tail.decode("utf-8")))
            whole = True
        except (ValueError, RecordProblem):
            whole = False
        if whole:
            log.warning("%s: the last line had no newline; added it", self.path)
            _write_all(self._fd, b"\n")
        else:
            torn = self.path.with_name(self.path.name + ".torn")
            with open(torn, "ab") as f:
                f.write(tail + b"\n")
                f.flush()
                os.fsync(f.fileno())
            log.warning("%s: moved an unfinished last line (%d bytes, an interrupted write) to %s",
                        self.path, len(tail), torn)
            os.ftruncate(self._fd, end)
        os.fsync(self._fd)

    def _add(self, record: dict) -> None:
        self.keys.add(self.key(record))
        if self._index is not None:
            self.index.add(self._index(record))
        self.count += 1

    def refresh(self) -> None:
        """Take in what other processes appended since the last look."""
        with self._lock, self._flocked():
            self._catch_up()

    def _catch_up(self) -> None:
        """Read the lines other writers appended since our last look."""
        size = os.fstat(self._fd).st_size
        if size <= self._offset:
            return
        data = _read_bytes(self._fd, self._offset, size - self._offset)
        end = data.rfind(b"\n") + 1
        for r in _parse_lines(self.path, data[:end], self._line, self.check):
            self._add(r)
        self._line += data[:end].count(b"\n")
        self._offset += end

    def append(self, record: dict) -> bool:
        """Validate and append ``record`` unless its key is stored already. Returns whether it was
        written. Raises RecordProblem for an invalid record (nothing is written)."""
        record = self.check(record)
        line = json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"
        k = self.key(record)
        with self._lock, self._flocked():
            self._catch_up()
            if k in self.keys:
                return False
            size = os.fstat(self._fd).st_size
            try:
                _write_all(self._fd, line)
                os.fsync(self._fd)
            except BaseException:
                os.ftruncate(self._fd, size)  # never leave half a line behind
                raise
            self._add(record)
            self._offset = size + len(line)
            self._line += 1
            return True


def _read_bytes(fd: int, offset: int, n: int) -> bytes:
    chunks = []
    while n > 0:
        b = os.pread(fd, n, offset)
        if not b:
            break
        chunks.append(b)
        offset += len(b)
        n -= len(b)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
