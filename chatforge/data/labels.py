"""People ranking answers of the SFT model: the candidates file the pipeline writes, the labels file people write.

    <run>/labels/candidates.jsonl   one JSON line per prompt to rank:
        {"prompt_id": str, "prompt": str | [messages], "answers": [{"id": str, "text": str}, ...]}
    <run>/labels/labels.jsonl       one JSON line per ranked prompt (the labelling page or a text editor):
        {"prompt_id": str, "prompt": ..., "answers": [...], "ranking": [[id, ...], [id, ...], ...],
         "labeler": str (optional), "time": str}

A ranking is a list of tie groups, best first; each answer id appears at most once; answers not named are
unranked. Every answer of a better group is preferred to every answer of a worse group, so a ranking of
groups g_1 > g_2 > ... gives sum_{i<j} |g_i| |g_j| (chosen, rejected) pairs, all from one prompt.
A prompt ranked again further down the file replaces its earlier ranking (the last line wins). A line whose
prompt is not among the candidates counts when it carries its own prompt and answers (the labelling page
writes such lines for prompts a person typed or took from a prompts file).

Ids are stable: a prompt's id is a hash of the prompt, an answer's a hash of its prompt id and text.
Bad input raises :class:`LabelsError` naming the file, the line and the problem.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from chatforge.data.records import DataError, iter_records
from chatforge.errors import UserInputError

Prompt = Union[str, list]  # a user message, or a list of {"role", "content"} messages


class LabelsError(UserInputError):
    """A candidates or labels file that cannot be used; the message names the file, the line and the problem."""


@dataclass
class Candidate:
    prompt_id: str
    prompt: Prompt
    answers: list[dict]  # [{"id", "text"}, ...]

    def to_json(self) -> dict:
        return {"prompt_id": self.prompt_id, "prompt": self.prompt, "answers": self.answers}


@dataclass
class Label:
    prompt_id: str
    prompt: Prompt
    texts: dict[str, str]  # answer id -> text
    ranking: list[list[str]]  # tie groups, best first
    source: str  # "file:line"
    extra: dict = field(default_factory=dict)  # labeler, time


def _hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def prompt_id(prompt: Prompt) -> str:
    return _hash("prompt", prompt)


def answer_id(pid: str, text: str) -> str:
    return _hash("answer", pid, text)


def make_candidate(prompt: Prompt, texts: list[str]) -> Candidate:
    """A prompt and its sampled answers with stable ids (an answer sampled twice is listed once)."""
    pid, seen, answers = prompt_id(prompt), set(), []
    for t in texts:
        aid = answer_id(pid, t)
        if aid not in seen:
            seen.add(aid)
            answers.append({"id": aid, "text": t})
    return Candidate(pid, prompt, answers)


def _lines(path: Path):
    """(line number, record) of a JSON-lines file, read by the project's one record reader; its problems (not
    UTF-8, invalid JSON) and a line that is not an object are LabelsErrors naming the file and line."""
    try:
        for n, rec in iter_records(path):
            if not isinstance(rec, dict):
                raise LabelsError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
            yield n, rec
    except DataError as e:
        raise LabelsError(str(e)) from None


def _prompt(rec: dict, where: str) -> Prompt:
    p = rec.get("prompt")
    ok = isinstance(p, str) and p.strip() or isinstance(p, list) and p and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in p)
    if not ok:
        raise LabelsError(f"{where}: 'prompt' must be a non-empty string or a list of {{role, content}} messages")
    return p


def _str_field(rec: dict, key: str, where: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str) or not v:
        raise LabelsError(f"{where}: missing or empty '{key}' (a string)")
    return v


def _answers(rec: dict, where: str) -> dict[str, str]:
    items = rec.get("answers")
    if not isinstance(items, list):
        raise LabelsError(f"{where}: 'answers' must be a list of {{id, text}} objects")
    out: dict[str, str] = {}
    for a in items:
        if not (isinstance(a, dict) and isinstance(a.get("id"), str) and isinstance(a.get("text"), str)):
            raise LabelsError(f"{where}: every answer must be an object with string 'id' and 'text'")
        if a["id"] in out:
            raise LabelsError(f"{where}: answer id '{a['id']}' is listed twice")
        out[a["id"]] = a["text"]
    return out


def write_candidates(path: str | Path, candidates: list[Candidate]) -> None:
    from chatforge.checkpoint import atomic_write_text

    atomic_write_text(Path(path), "".join(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in candidates))


def read_candidates(path: str | Path) -> dict[str, Candidate]:
    """prompt_id -> Candidate, in file order."""
    path = Path(path)
    out: dict[str, Candidate] = {}
    for n, rec in _lines(path):
        where = f"{path}:{n}"
        pid = _str_field(rec, "prompt_id", where)
        if pid in out:
            raise LabelsError(f"{where}: prompt_id '{pid}' appears twice")
        texts = _answers(rec, where)
        out[pid] = Candidate(pid, _prompt(rec, where), [{"id": i, "text": t} for i, t in texts.items()])
    return out


def read_labels(path: str | Path, candidates: Optional[dict[str, Candidate]] = None) -> list[Label]:
    """The rankings of a labels file, checked against the candidates when given (else against each line's own
    answers); one Label per prompt, the last line of a prompt winning, in order of first appearance."""
    path = Path(path)
    out: dict[str, Label] = {}
    for n, rec in _lines(path):
        where = f"{path}:{n}"
        pid = _str_field(rec, "prompt_id", where)
        if candidates is not None and pid not in candidates and not ("prompt" in rec and "answers" in rec):
            raise LabelsError(f"{where}: unknown prompt_id '{pid}' (not among the candidates, and the line carries no "
                              f"prompt and answers of its own)")
        if candidates is not None and pid in candidates:
            cand = candidates[pid]
            if "prompt" in rec and rec["prompt"] != cand.prompt:
                raise LabelsError(f"{where}: the prompt differs from the candidate's prompt of id '{pid}'")
            prompt, texts = cand.prompt, {a["id"]: a["text"] for a in cand.answers}
        else:
            prompt, texts = _prompt(rec, where), _answers(rec, where)
        ranking = rec.get("ranking")
        if not isinstance(ranking, list) or not all(isinstance(g, list) for g in ranking):
            raise LabelsError(f"{where}: 'ranking' must be a list of tie groups (lists of answer ids), best first")
        seen: set[str] = set()
        for g in ranking:
            for aid in g:
                if not isinstance(aid, str):
                    raise LabelsError(f"{where}: ranking entry {aid!r} is not an answer id (a string)")
                if aid in seen:
                    raise LabelsError(f"{where}: the ranking names answer '{aid}' twice")
                if aid not in texts:
                    raise LabelsError(f"{where}: unknown answer id '{aid}' for prompt '{pid}'")
                seen.add(aid)
        for key in ("labeler", "time"):
            if key in rec and not isinstance(rec[key], str):
                raise LabelsError(f"{where}: '{key}' must be a string")
        groups = [list(g) for g in ranking if g]
        out.pop(pid, None)  # a later ranking of the same prompt replaces the earlier one
        out[pid] = Label(pid, prompt, texts, groups, where, {k: rec[k] for k in ("labeler", "time") if k in rec})
    return list(out.values())


def ranking_pairs(ranking: list[list[str]]) -> list[tuple[str, str]]:
    """Tie groups, best first -> (chosen id, rejected id) for every answer of a better group against every
    answer of a worse one: [[a], [b, c], [d]] -> (a,b) (a,c) (a,d) (b,d) (c,d)."""
    pairs = []
    for i, better in enumerate(ranking):
        for worse in ranking[i + 1:]:
            pairs += [(c, r) for c in better for r in worse]
    return pairs


def label_pairs(label: Label) -> list[dict]:
    """A ranked prompt -> preference records {"prompt", "chosen", "rejected"} (+ ids) for the rm stage."""
    return [{"prompt": label.prompt, "chosen": label.texts[c], "rejected": label.texts[r], "prompt_id": label.prompt_id,
             "chosen_id": c, "rejected_id": r} for c, r in ranking_pairs(label.ranking)]
