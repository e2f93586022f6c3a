"""SFT data: files of conversations -> ``Conversation(messages, source)``.

A conversation is a list of ``{"role": "system"|"user"|"assistant", "content": str}``: an
optional system message first, then turns that start with the user and end with an assistant
answer. Accepted record formats (one per JSONL line or JSON array element):

- ``{"messages": [{"role", "content"}, ...]}``
- ShareGPT ``{"conversations": [{"from": human|user|gpt|assistant|system, "value"}], "system"?}``
- Alpaca ``{"instruction", "input"?, "output", "system"?, "history"?}``: the user turn is the
  instruction, plus ``"\\n\\n" + input`` when the input is non-empty; ``history`` (LLaMA-Factory)
  is a list of ``[user, assistant]`` pairs that come before it.
- Self-Instruct seed tasks ``{"instruction", "instances": [{"input", "output"}]}``: one
  conversation per instance (source ``file:line#k`` when a task has several instances).
- ``{"prompt", "response"}`` and TRL ``{"prompt", "completion"}``; each side may be a string
  (a user / assistant message) or a list of messages.

Policy: a bad record is an error by default (``DataError`` naming file, line and problem):
unknown format, unknown role, non-string content, a system message after the first turn, a
conversation that starts with the assistant or ends with a user turn, no assistant turn, an empty
assistant response. With ``strict=False`` such records are skipped and counted by reason
(``result.skips``, also logged), as is a ``.jsonl`` line that is not valid JSON (invalid JSON in a ``.json``
array always fails). Content is kept exactly as written.

Consecutive turns of the same role are allowed (they are rendered one after another).
The message helpers and the HH-RLHF transcript parser here are shared with the preference and
prompt readers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Union

from chatforge.data.records import DataList, PathLike, RecordProblem, read_records

Message = dict  # {"role": str, "content": str}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}

SFT_FORMATS = (
    '{"messages": [{"role", "content"}]}',
    'ShareGPT {"conversations": [{"from", "value"}]}',
    'Alpaca {"instruction", "input", "output"}',
    'Self-Instruct {"instruction", "instances": [{"input", "output"}]}',
    '{"prompt", "response"}',
    '{"prompt", "completion"}',
)


@dataclass
class Conversation:
    messages: list[Message]
    source: str  # "file:line"


# ----------------------------------------------------------------------------- messages


def _type(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(x), type(x).__name__)


def need_object(rec: Any) -> dict:
    if not isinstance(rec, dict):
        raise RecordProblem(f"expected a JSON object, got {_type(rec)}", "not an object")
    return rec


def need_str(x: Any, what: str) -> str:
    if not isinstance(x, str):
        raise RecordProblem(f"{what} must be a string, got {_type(x)}", "non-string content")
    return x


def to_message(item: Any, what: str) -> Message:
    """One message from ``{"role", "content"}`` or ShareGPT ``{"from", "value"}``."""
    if not isinstance(item, dict):
        raise RecordProblem(f"{what} must be an object, got {_type(item)}", "bad message")
    if "role" in item:
        role, content = item["role"], item.get("content")
        if role not in ROLES:
            raise RecordProblem(f"{what} has unknown role {role!r} (known: {', '.join(ROLES)})", "unknown role")
    elif "from" in item:
        role, content = SHAREGPT_ROLES.get(item["from"]), item.get("value")
        if role is None:
            raise RecordProblem(f"{what} has unknown role {item['from']!r} "
                                f"(known: {', '.join(SHAREGPT_ROLES)})", "unknown role")
    else:
        raise RecordProblem(f"{what} has no 'role' (or ShareGPT 'from')", "bad message")
    return {"role": role, "content": need_str(content, f"{what} content")}


def to_messages(items: Any, what: str) -> list[Message]:
    """A message list (either message style); a string ``what`` names it in errors."""
    if not isinstance(items, list):
        raise RecordProblem(f"'{what}' must be a list of messages, got {_type(items)}", "bad message")
    return [to_message(m, f"{what}[{i}]") for i, m in enumerate(items)]


def _check_opening(msgs: list[Message], what: str) -> None:
    if not msgs:
        raise RecordProblem(f"{what} is empty", "empty conversation")
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i > 0:
            raise RecordProblem(f"{what} has a system message after the first turn (turn {i})", "misplaced system message")
    first = msgs[1] if msgs[0]["role"] == "system" and len(msgs) > 1 else msgs[0]
    if first["role"] == "assistant":
        raise RecordProblem(f"{what} starts with the assistant", "starts with the assistant")
    if first["role"] == "system":
        raise RecordProblem(f"{what} has only a system message", "no user turn")


def check_conversation(msgs: list[Message]) -> list[Message]:
    """Validate a full SFT conversation (see the module docstring); returns it."""
    _check_opening(msgs, "conversation")
    if not any(m["role"] == "assistant" for m in msgs):
        raise RecordProblem("record has no assistant turn", "no assistant turn")
    for i, m in enumerate(msgs):
        if m["role"] == "assistant" and not m["content"].strip():
            raise RecordProblem(f"empty assistant response (turn {i})", "empty response")
    if msgs[-1]["role"] != "assistant":
        raise RecordProblem("conversation ends with a user turn (nothing to learn from it)", "ends with a user turn")
    return msgs


def check_prompt(msgs: list[Message], what: str = "prompt") -> list[Message]:
    """Validate a context for generation: optional system, starts with user, ends with user."""
    _check_opening(msgs, what)
    if msgs[-1]["role"] != "user":
        raise RecordProblem(f"{what} does not end with a user turn", "prompt does not end with a user turn")
    if not msgs[-1]["content"].strip():
        raise RecordProblem(f"{what} has an empty final user turn", "empty prompt")
    return msgs


def system_message(rec: dict) -> list[Message]:
    """The optional top-level ``system`` field (ShareGPT / Alpaca of LLaMA-Factory)."""
    s = rec.get("system")
    if s is None or s == "":
        return []
    return [{"role": "system", "content": need_str(s, "'system'")}]


def alpaca_user(instruction: Any, inp: Any) -> str:
    """Instruction, then a blank line and the input when the input is non-empty."""
    parts = [need_str(instruction, "'instruction'"), need_str("" if inp is None else inp, "'input'")]
    return "\n\n".join(p for p in parts if p)


def alpaca_history(rec: dict) -> list[Message]:
    """LLaMA-Factory ``history``: ``[[user, assistant], ...]`` turns before the instruction."""
    hist = rec.get("history") or []
    if not isinstance(hist, list):
        raise RecordProblem(f"'history' must be a list of [user, assistant] pairs, got {_type(hist)}", "bad history")
    out: list[Message] = []
    for i, pair in enumerate(hist):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise RecordProblem(f"history[{i}] must be a [user, assistant] pair", "bad history")
        out.append({"role": "user", "content": need_str(pair[0], f"history[{i}][0]")})
        out.append({"role": "assistant", "content": need_str(pair[1], f"history[{i}][1]")})
    return out


def side(x: Any, role: str, what: str) -> list[Message]:
    """A prompt/response side: a string is one message of ``role``, a list is messages."""
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, list):
        return to_messages(x, what)
    raise RecordProblem(f"'{what}' must be a string or a list of messages, got {_type(x)}", "non-string content")


# ----------------------------------------------------------------------------- HH-RLHF

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def is_hh_transcript(text: Any) -> bool:
    return isinstance(text, str) and ("\n\nAssistant:" in text or text.startswith(("\n\nHuman:", "Human:")))


def parse_hh_transcript(text: str, what: str = "transcript") -> list[Message]:
    """``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` -> messages (each content stripped of the
    surrounding whitespace the format puts around it)."""
    if text.startswith("Human:"):
        text = "\n\n" + text
    parts = _HH_TURN.split(text)  # [before, role, content, role, content, ...]
    if parts[0].strip():
        raise RecordProblem(f"{what} does not start with a '\\n\\nHuman:' turn", "bad transcript")
    return [
        {"role": "user" if role == "Human" else "assistant", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2])
    ]


def split_hh_transcript(text: str, what: str = "transcript") -> tuple[list[Message], str]:
    """A transcript -> (prompt messages before the final assistant turn, final answer)."""
    msgs = parse_hh_transcript(text, what)
    if not any(m["role"] == "assistant" for m in msgs):
        raise RecordProblem(f"{what} has no assistant turn", "no assistant turn")
    if msgs[-1]["role"] != "assistant":
        raise RecordProblem(f"{what} does not end with an assistant turn", "ends with a user turn")
    return msgs[:-1], msgs[-1]["content"]


# ----------------------------------------------------------------------------- records -> conversations


def conversation_messages(rec: Any) -> list[list[Message]]:
    """One record -> its conversations' messages (unvalidated); raises RecordProblem for an
    unknown format. Self-Instruct tasks give one conversation per instance."""
    rec = need_object(rec)
    if "messages" in rec:
        return [to_messages(rec["messages"], "messages")]
    if "conversations" in rec:
        return [system_message(rec) + to_messages(rec["conversations"], "conversations")]
    if "instruction" in rec and "instances" in rec:
        inst = rec["instances"]
        if not isinstance(inst, list) or not inst:
            raise RecordProblem("'instances' must be a non-empty list of {input, output}", "bad instances")
        out = []
        for k, x in enumerate(inst):
            if not isinstance(x, dict) or "output" not in x:
                raise RecordProblem(f"instances[{k}] must be an object with 'input' and 'output'", "bad instances")
            out.append([
                {"role": "user", "content": alpaca_user(rec["instruction"], x.get("input"))},
                {"role": "assistant", "content": need_str(x["output"], f"instances[{k}].output")},
            ])
        return out
    if "instruction" in rec and "output" in rec:
        return [system_message(rec) + alpaca_history(rec) + [
            {"role": "user", "content": alpaca_user(rec["instruction"], rec.get("input"))},
            {"role": "assistant", "content": need_str(rec["output"], "'output'")},
        ]]
    if "prompt" in rec and ("completion" in rec or "response" in rec):
        key = "completion" if "completion" in rec else "response"
        return [side(rec["prompt"], "user", "prompt") + side(rec[key], "assistant", key)]
    keys = ", ".join(sorted(rec)) or "none"
    raise RecordProblem(f"unknown SFT record format (keys: {keys}); known formats: {'; '.join(SFT_FORMATS)}",
                        "unknown format")


def _parse(rec: Any, where: str) -> list[Conversation]:
    convs = conversation_messages(rec)
    if len(convs) == 1:
        return [Conversation(check_conversation(convs[0]), where)]
    return [Conversation(check_conversation(m), f"{where}#{k}") for k, m in enumerate(convs)]


def read_conversations(paths: Union[PathLike, Iterable[PathLike]], *, strict: bool = True) -> DataList:
    """Read SFT conversations from files or folders (.jsonl, .jsonl.gz, .json, .json.gz).

    Returns a list of Conversation with ``.skips`` (SkipCounter) and ``.files``.
    Raises DataError (file, line, problem) on bad input; see the module docstring for the policy.
    """
    return read_records(paths, _parse, strict=strict, what="conversations")
