"""Preference data: files of comparisons -> ``PreferencePair(prompt, chosen, rejected, source)``.

``prompt`` is the shared context (messages, optional system first, ending with a user turn);
``chosen`` and ``rejected`` are the two final assistant answers (strings). Accepted formats:

- ``{"prompt", "chosen", "rejected"}``: the prompt is a string (one user message) or a message
  list; chosen/rejected are strings, one assistant message, or message lists whose last message
  is the assistant answer. Earlier messages in those lists extend the context (a copy of the
  prompt at their start, as in UltraFeedback-binarized, is recognised and not repeated) and must
  be the same in both.
- TRL implicit prompt ``{"chosen": [...], "rejected": [...]}``: message lists sharing a prefix;
  the prefix is the prompt.
- HH-RLHF ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``: transcripts are
  parsed into turns; the prompt is everything before the final ``Assistant:`` turn.
- LLaMA-Factory / ShareGPT ``{"conversations": [{"from", "value"}], "chosen": {"from", "value"},
  "rejected": {...}, "system"?}``.

Policy:
- Always a counted skip (never an error): a pair whose chosen and rejected answers are identical
  (after stripping whitespace); it carries no preference signal.
- Errors by default (``DataError`` naming file, line, problem), counted skips with
  ``strict=False``: missing chosen/rejected, unknown format, a transcript with no assistant turn,
  chosen and rejected prompts that differ, an empty answer, a prompt that does not end with a
  user turn, unknown roles, non-string content, a ``.jsonl`` line that is not valid JSON (invalid JSON in a
  ``.json`` array always fails).
- The official HH-RLHF harmless-base test file holds 4 pairs with an empty chosen answer and 5
  whose chosen and rejected transcripts do not share their prompt; read it with ``strict=False``
  (2,303 of 2,312 pairs are kept, the 9 others are counted in ``.skips``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Union

from chatforge.data.conversations import (
    Message,
    check_prompt,
    is_hh_transcript,
    need_object,
    side,
    split_hh_transcript,
    system_message,
    to_message,
    to_messages,
)
from chatforge.data.records import DataList, PathLike, RecordProblem, Skip, read_records

PREFERENCE_FORMATS = (
    '{"prompt", "chosen", "rejected"}',
    'TRL implicit prompt {"chosen": [messages], "rejected": [messages]}',
    'HH-RLHF {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}',
    'ShareGPT {"conversations", "chosen": {"from", "value"}, "rejected": {...}}',
)


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: str
    rejected: str
    source: str  # "file:line"


def _answer(x: Any, name: str) -> tuple[list[Message], str]:
    """A chosen/rejected field -> (context messages before the answer, answer text)."""
    if isinstance(x, str):
        return [], x
    if isinstance(x, dict):
        msgs = [to_message(x, name)]
    elif isinstance(x, list):
        msgs = to_messages(x, name)
    else:
        raise RecordProblem(f"'{name}' must be a string, a message or a list of messages, got "
                            f"{type(x).__name__}", "non-string content")
    if not msgs or msgs[-1]["role"] != "assistant":
        raise RecordProblem(f"'{name}' does not end with an assistant message", "no assistant turn")
    return msgs[:-1], msgs[-1]["content"]


def _strip_prefix(msgs: list[Message], prefix: list[Message]) -> list[Message]:
    return msgs[len(prefix):] if prefix and msgs[: len(prefix)] == prefix else msgs


def parse_preference(rec: Any) -> tuple[list[Message], str, str]:
    """One record -> (prompt, chosen, rejected), validated. Raises RecordProblem or Skip."""
    rec = need_object(rec)
    missing = [k for k in ("chosen", "rejected") if k not in rec]
    if len(missing) == 2:
        keys = ", ".join(sorted(rec)) or "none"
        raise RecordProblem(f"unknown preference record format (keys: {keys}); known formats: "
                            f"{'; '.join(PREFERENCE_FORMATS)}", "missing chosen/rejected")
    if missing:
        raise RecordProblem(f"record has no {missing[0]!r} field", "missing chosen/rejected")
    c, r = rec["chosen"], rec["rejected"]

    if "conversations" in rec:
        context = system_message(rec) + to_messages(rec["conversations"], "conversations")
    elif "prompt" in rec:
        context = side(rec["prompt"], "user", "prompt")
    elif isinstance(c, str) and isinstance(r, str):
        if not (is_hh_transcript(c) and is_hh_transcript(r)):
            raise RecordProblem("'chosen' and 'rejected' are plain strings but the record has no 'prompt' "
                                "(and they are not HH-RLHF transcripts)", "no prompt")
        pc, chosen = split_hh_transcript(c, "chosen transcript")
        pr, rejected = split_hh_transcript(r, "rejected transcript")
        if pc != pr:
            raise RecordProblem("chosen and rejected prompts differ", "prompts differ")
        return _finish(pc, chosen, rejected)
    else:
        context = []

    pc, chosen = _answer(c, "chosen")
    pr, rejected = _answer(r, "rejected")
    pc, pr = _strip_prefix(pc, context), _strip_prefix(pr, context)
    if pc != pr:
        raise RecordProblem("chosen and rejected prompts differ", "prompts differ")
    return _finish(context + pc, chosen, rejected)


def _finish(prompt: list[Message], chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    check_prompt(prompt)
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RecordProblem(f"empty {name} response", "empty response")
    if chosen.strip() == rejected.strip():
        raise Skip("identical chosen and rejected")
    return prompt, chosen, rejected


def _parse(rec: Any, where: str) -> list[PreferencePair]:
    prompt, chosen, rejected = parse_preference(rec)
    return [PreferencePair(prompt, chosen, rejected, where)]


def read_preferences(paths: Union[PathLike, Iterable[PathLike]], *, strict: bool = True) -> DataList:
    """Read preference pairs from files or folders (.jsonl, .jsonl.gz, .json, .json.gz).

    Returns a list of PreferencePair with ``.skips`` (SkipCounter: identical pairs always, and
    bad records when ``strict=False``) and ``.files``. See the module docstring for the policy.
    """
    return read_records(paths, _parse, strict=strict, what="preference pairs")
