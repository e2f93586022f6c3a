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

The record checks live in ``label_records.py``, the append-only file machinery in ``append_log.py``.
"""

from __future__ import annotations

import os  # noqa: F401  (tests patch os.write through this module)
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Optional

from chatforge.data.conversations import check_prompt, side
from chatforge.data.records import DataError, PathLike, RecordProblem, read_records
from chatforge.serve.append_log import AppendLog, read_lines
from chatforge.serve.label_records import (Prompt, answer_id, check_answers, check_candidate, check_demonstration,
                                           check_label, check_ranking, demonstration_key, label_key,
                                           normalise_prompt, prompt_id, prompt_messages, ranking_to_pairs)

__all__ = ["DEMONSTRATIONS_FILE", "LABELS_FILE", "DataError", "LabelStore", "Prompt", "Submitted", "answer_id",
           "check_answers", "check_candidate", "check_demonstration", "check_label", "check_ranking",
           "demonstration_key", "label_key", "next_unlabelled", "normalise_prompt", "now_iso", "prompt_id",
           "prompt_messages", "ranking_to_pairs", "read_candidates", "read_demonstrations", "read_labels"]

LABELS_FILE = "labels.jsonl"
DEMONSTRATIONS_FILE = "demonstrations.jsonl"


def read_labels(path: PathLike) -> list[dict]:
    """Every label record of a labels file, validated (an unfinished last line is skipped with a
    warning; any other bad line raises DataError naming file and line). A missing file is empty."""
    return read_lines(Path(path), check_label)[0]


def read_demonstrations(path: PathLike) -> list[dict]:
    """Every ``{"messages"}`` record of a demonstrations file (same policy as :func:`read_labels`)."""
    return read_lines(Path(path), check_demonstration)[0]


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
