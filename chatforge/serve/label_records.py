"""The label store's records: stable ids of prompts and answers, the checks of each record kind (a ranking
label, a candidates entry, a written demonstration) and their duplicate keys, and a ranking's preference pairs.
The file formats are described in :mod:`chatforge.serve.labels`."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Union

from chatforge.data.conversations import check_conversation, check_prompt, side
from chatforge.data.labels import ranking_pairs
from chatforge.data.records import RecordProblem

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
