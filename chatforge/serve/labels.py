"""The label store: rankings and written answers that people give on the labelling page.

Three JSON-lines files, their formats fixed (the pipeline reads them):

- **candidates** (written by the pipeline for people to rank, read here):
  ``{"prompt_id": str, "prompt": str | [messages], "answers": [{"id": str, "text": str}, ...]}``
- **labels** ``<labels_dir>/labels.jsonl`` (appended here):
  ``{"prompt_id", "prompt", "answers", "ranking": [[id, ...], [id, ...], ...], "labeler"?: str,
  "time": ISO-8601 str}``. ``ranking`` lists tie groups, best first; an id appears at most once;
  answers not named are unranked (compared with nothing). Every answer of a better group is
  preferred to every answer of a worse group (:func:`ranking_to_pairs`).
- **demonstrations** ``<labels_dir>/demonstrations.jsonl`` (appended here):
  ``{"messages": [..., {"role": "user", ...}, {"role": "assistant", "content": answer}]}``, the SFT
  conversation format the ``sft`` stage reads as it is.

For a prompt typed on the page (not from a candidates file) ``prompt_id`` is :func:`prompt_id` (a
hash of the prompt) and each answer id is :func:`answer_id` (a hash of its text), so the same
prompt and answers get the same ids in every run.

Appends are atomic: a record is one line, written with one ``write`` of the whole line, flushed and
fsynced under a lock (a thread lock and an ``flock`` on the file, so several processes may share a
labels folder) before the submission is acknowledged. A restart loses nothing acknowledged. A crash
in the middle of a write can leave only an unfinished last line with no newline; opening the store
moves such a tail to ``<file>.torn`` (or completes it with its newline when it is a whole valid
record), and the reader skips it with a warning. Any other bad line is an error naming file, line
and problem. The same record submitted twice (same content, whatever its time) is stored once.

This module is pure Python (no web code): the routes in ``label_routes.py`` call it, and the
pipeline imports :func:`read_labels` and :func:`ranking_to_pairs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

from chatforge.data.labels import ranking_pairs
from chatforge.data.conversations import check_conversation, check_prompt, side
from chatforge.data.records import DataError, PathLike, RecordProblem, read_records

try:  # POSIX: an advisory lock shared by every process that appends to the same file
    import fcntl
except ImportError:  # pragma: no cover - Windows: the thread lock alone
    fcntl = None

log = logging.getLogger("chatforge.serve")

LABELS_FILE = "labels.jsonl"
DEMONSTRATIONS_FILE = "demonstrations.jsonl"

Prompt = Union[str, list]  # a user message, or a message list ending with a user turn


# ----------------------------------------------------------------------------- ids


def _canonical(x: Any) -> bytes:
    """One byte string per JSON value (sorted keys, no spaces), for hashing."""
    return json.dumps(x, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _hash(x: Any) -> str:
    return hashlib.sha256(_canonical(x)).hexdigest()[:16]


def prompt_id(prompt: Prompt) -> str:
    """Stable id of a prompt typed on the page: 16 hex digits of sha256 over its JSON.

    A string and the one-user-message list holding it are the same prompt and get the same id."""
    return "p-" + _hash(normalise_prompt(prompt))


def answer_id(text: str) -> str:
    """Stable id of an answer: 16 hex digits of sha256 over its text."""
    return "a-" + _hash(text)


# ----------------------------------------------------------------------------- validation


def normalise_prompt(prompt: Any) -> Prompt:
    """A prompt as stored: a non-empty string, or a message list (optional system, starting and
    ending with a user turn). A list of one user message becomes its string. Raises RecordProblem."""
    msgs = check_prompt(side(prompt, "user", "prompt"))
    if len(msgs) == 1:
        return msgs[0]["content"]
    return msgs


def prompt_messages(prompt: Prompt) -> list[dict]:
    """The messages of a stored prompt (a string is one user message)."""
    return side(prompt, "user", "prompt")


def check_answers(answers: Any) -> list[dict]:
    """``[{"id": str, "text": str}, ...]``: at least one, ids non-empty and distinct, texts strings."""
    if not isinstance(answers, list) or not answers:
        raise RecordProblem("'answers' must be a non-empty list of {\"id\", \"text\"}", "bad answers")
    out, seen = [], set()
    for i, a in enumerate(answers):
        if not isinstance(a, dict) or not isinstance(a.get("id"), str) or not isinstance(a.get("text"), str):
            raise RecordProblem(f"answers[{i}] must be an object with string 'id' and 'text'", "bad answers")
        if not a["id"]:
            raise RecordProblem(f"answers[{i}] has an empty id", "bad answers")
        if a["id"] in seen:
            raise RecordProblem(f"answers[{i}] repeats the id {a['id']!r}", "bad answers")
        seen.add(a["id"])
        out.append({"id": a["id"], "text": a["text"]})
    return out


def check_ranking(ranking: Any, answers: list[dict]) -> list[list[str]]:
    """Tie groups, best first: non-empty lists of known answer ids, each id at most once, at least
    two groups (a ranking with one group prefers nothing to anything)."""
    if not isinstance(ranking, list):
        raise RecordProblem("'ranking' must be a list of tie groups (lists of answer ids)", "bad ranking")
    known = {a["id"] for a in answers}
    seen: set = set()
    out = []
    for g, group in enumerate(ranking):
        if not isinstance(group, list) or not group:
            raise RecordProblem(f"ranking[{g}] must be a non-empty list of answer ids", "bad ranking")
        for x in group:
            if not isinstance(x, str) or x not in known:
                raise RecordProblem(f"ranking[{g}] names {x!r}, which is not an answer id", "bad ranking")
            if x in seen:
                raise RecordProblem(f"ranking names {x!r} more than once", "bad ranking")
            seen.add(x)
        out.append(list(group))
    if len(out) < 2:
        raise RecordProblem("a ranking needs at least two groups (one answer better than another)", "bad ranking")
    return out


def check_label(rec: Any) -> dict:
    """A labels-file record (see the module docstring), validated; raises RecordProblem."""
    if not isinstance(rec, dict):
        raise RecordProblem("expected a JSON object", "not an object")
    for key in ("prompt_id", "prompt", "answers", "ranking", "time"):
        if key not in rec:
            raise RecordProblem(f"missing field {key!r}", "missing field")
    if not isinstance(rec["prompt_id"], str) or not rec["prompt_id"]:
        raise RecordProblem("'prompt_id' must be a non-empty string", "bad prompt_id")
    prompt = rec["prompt"]
    check_prompt(side(prompt, "user", "prompt"))
    answers = check_answers(rec["answers"])
    ranking = check_ranking(rec["ranking"], answers)
    out = {"prompt_id": rec["prompt_id"], "prompt": prompt, "answers": answers, "ranking": ranking}
    if rec.get("labeler") is not None:
        if not isinstance(rec["labeler"], str):
            raise RecordProblem("'labeler' must be a string", "bad labeler")
        out["labeler"] = rec["labeler"]
    if not isinstance(rec["time"], str):
        raise RecordProblem("'time' must be an ISO-8601 string", "bad time")
    try:
        datetime.fromisoformat(rec["time"])
    except ValueError:
        raise RecordProblem(f"'time' is not an ISO-8601 time: {rec['time']!r}", "bad time") from None
    out["time"] = rec["time"]
    return out


def check_candidate(rec: Any) -> dict:
    """A candidates-file record ``{"prompt_id", "prompt", "answers"}``, validated; raises RecordProblem."""
    if not isinstance(rec, dict):
        raise RecordProblem("expected a JSON object", "not an object")
    for key in ("prompt_id", "prompt", "answers"):
        if key not in rec:
            raise RecordProblem(f"missing field {key!r}", "missing field")
    if not isinstance(rec["prompt_id"], str) or not rec["prompt_id"]:
        raise RecordProblem("'prompt_id' must be a non-empty string", "bad prompt_id")
    check_prompt(side(rec["prompt"], "user", "prompt"))
    return {"prompt_id": rec["prompt_id"], "prompt": rec["prompt"], "answers": check_answers(rec["answers"])}


def check_demonstration(rec: Any) -> dict:
    """A demonstrations-file record ``{"messages": [...]}`` ending with a non-empty assistant answer."""
    if not isinstance(rec, dict) or "messages" not in rec:
        raise RecordProblem("expected an object with 'messages'", "missing field")
    return {"messages": check_conversation(side(rec["messages"], "user", "messages"))}


def label_key(rec: dict) -> str:
    """What makes two label records the same submission: everything but the time (tie groups
    compared as sets)."""
    ranking = [sorted(g) for g in rec["ranking"]]
    return _hash([rec["prompt_id"], rec["prompt"], rec["answers"], ranking, rec.get("labeler")])


def demonstration_key(rec: dict) -> str:
    return _hash(rec["messages"])


# ----------------------------------------------------------------------------- pairs


def ranking_to_pairs(record: dict) -> list[dict]:
    """A label record -> preference pairs ``{"prompt", "chosen", "rejected"}`` (the preference format), expanded by
    the pipeline's own rule (chatforge.data.labels.ranking_pairs): every answer of a better tie group is chosen
    over every answer of every worse group; one group's answers, and unranked ones, give no pair. A pair of two
    identical texts (different ids) is left out: it carries no preference."""
    text = {a["id"]: a["text"] for a in record["answers"]}
    return [{"prompt": record["prompt"], "chosen": text[c], "rejected": text[r]}
            for c, r in ranking_pairs(record["ranking"]) if text[c] != text[r]]


# ----------------------------------------------------------------------------- files


def _read_lines(path: Path, check: Callable[[Any], dict]) -> tuple[list[dict], int]:
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


def read_labels(path: PathLike) -> list[dict]:
    """Every label record of a labels file, validated (an unfinished last line is skipped with a
    warning; any other bad line raises DataError naming file and line). A missing file is empty."""
    return _read_lines(Path(path), check_label)[0]


def read_demonstrations(path: PathLike) -> list[dict]:
    """Every ``{"messages"}`` record of a demonstrations file (same policy as :func:`read_labels`)."""
    return _read_lines(Path(path), check_demonstration)[0]


def read_candidates(path: PathLike) -> list[dict]:
    """The candidates file the pipeline writes: validated records, in file order, prompt ids distinct.
    A bad record raises DataError naming file and line."""
    seen: dict = {}

    def parse(rec: Any, where: str) -> list[dict]:
        c = check_candidate(rec)
        if c["prompt_id"] in seen:
            raise RecordProblem(f"prompt_id {c['prompt_id']!r} repeats the one at {seen[c['prompt_id']]}",
                                "repeated prompt_id")
        seen[c["prompt_id"]] = where
        return [c]

    return list(read_records(path, parse, what="candidates"))


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
            records, self._offset = _read_lines(self.path, check)
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


# ----------------------------------------------------------------------------- the store


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Submitted:
    record: dict
    stored: bool
    """False when the same submission was stored before (nothing written)."""


class LabelStore:
    """The labels and demonstrations files of one labels folder (created if missing)."""

    def __init__(self, labels_dir: PathLike):
        self.dir = Path(labels_dir)
        self.labels = AppendLog(self.dir / LABELS_FILE, check_label, label_key, index=lambda r: r["prompt_id"])
        self.demonstrations = AppendLog(self.dir / DEMONSTRATIONS_FILE, check_demonstration, demonstration_key)

    def close(self) -> None:
        self.labels.close()
        self.demonstrations.close()

    def add_ranking(self, prompt_id: str, prompt: Any, answers: Any, ranking: Any,
                    labeler: Optional[str] = None, time: Optional[str] = None) -> Submitted:
        """Append one ranking (validated; see the module docstring). Raises RecordProblem."""
        rec = {"prompt_id": prompt_id, "prompt": prompt, "answers": answers, "ranking": ranking,
               "time": time or now_iso()}
        if labeler:
            rec["labeler"] = labeler
        rec = check_label(rec)
        return Submitted(rec, self.labels.append(rec))

    def add_demonstration(self, prompt: Any, answer: Any) -> Submitted:
        """Append the conversation ``prompt`` + an assistant turn ``answer``. Raises RecordProblem."""
        if not isinstance(answer, str) or not answer.strip():
            raise RecordProblem("the written answer is empty", "empty response")
        msgs = check_prompt(side(prompt, "user", "prompt"))
        rec = {"messages": msgs + [{"role": "assistant", "content": answer}]}
        return Submitted(rec, self.demonstrations.append(rec))

    def labelled_prompt_ids(self) -> set:
        """Prompt ids that have at least one ranking (other processes' appends included)."""
        self.labels.refresh()
        return set(self.labels.index)


def next_unlabelled(candidates: Iterable[dict], labelled: set, skip: Iterable[str] = ()) -> Optional[dict]:
    """The first candidate (file order) whose prompt id is neither labelled nor in ``skip``."""
    skip = set(skip)
    for c in candidates:
        if c["prompt_id"] not in labelled and c["prompt_id"] not in skip:
            return c
    return None
