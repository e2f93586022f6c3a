"""RL prompt data: files of prompts -> ``Prompt(messages, source)``.

``messages`` is a context for generation: an optional system message, then turns starting with
the user and ending with a user turn (the model answers next). Accepted formats:

- a plain JSON string per line (or per array element): one user message;
- ``{"prompt": str | [messages]}`` (other fields, such as a reference answer, are ignored);
- ``{"messages": [...]}`` or ShareGPT ``{"conversations": [...]}``: if the conversation ends with
  an assistant turn, that final turn is dropped (it is a reference answer, not part of the
  prompt), so SFT files can serve as prompt files;
- HH-RLHF ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ..."}``: the text before the final
  Assistant turn;
- Alpaca ``{"instruction", "input"?}`` (+ ``system``, ``history``): the user turn as for SFT.

Policy: a bad record (an empty prompt, unknown format or role, non-string content, a context
that starts with the assistant) is a ``DataError`` naming file, line and problem by default, a
counted skip with ``strict=False`` (``result.skips``, also logged), and so is a ``.jsonl`` line that is not
valid JSON; invalid JSON in a ``.json`` array always fails (the reader cannot resynchronise after it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Union

from chatforge.data.conversations import (
    Message,
    alpaca_history,
    alpaca_user,
    check_prompt,
    is_hh_transcript,
    side,
    split_hh_transcript,
    system_message,
    to_messages,
)
from chatforge.data.records import DataList, PathLike, RecordProblem, read_records

PROMPT_FORMATS = (
    "a JSON string",
    '{"prompt": string | [messages]}',
    '{"messages": [...]} / {"conversations": [...]} (a final assistant turn is dropped)',
    'HH-RLHF {"chosen": transcript}',
    'Alpaca {"instruction", "input"}',
)


@dataclass
class Prompt:
    messages: list[Message]
    source: str  # "file:line"


def _drop_final_answer(msgs: list[Message]) -> list[Message]:
    return msgs[:-1] if msgs and msgs[-1]["role"] == "assistant" else msgs


def prompt_messages(rec: Any) -> list[Message]:
    """One record -> validated prompt messages. Raises RecordProblem."""
    if isinstance(rec, str):
        msgs = [{"role": "user", "content": rec}]
    elif not isinstance(rec, dict):
        raise RecordProblem(f"expected a JSON string or object, got {type(rec).__name__}", "not an object")
    elif "prompt" in rec:
        msgs = side(rec["prompt"], "user", "prompt")
    elif "messages" in rec:
        msgs = _drop_final_answer(to_messages(rec["messages"], "messages"))
    elif "conversations" in rec:
        msgs = _drop_final_answer(system_message(rec) + to_messages(rec["conversations"], "conversations"))
    elif "chosen" in rec and is_hh_transcript(rec["chosen"]):
        msgs, _ = split_hh_transcript(rec["chosen"], "chosen transcript")
    elif "instruction" in rec:
        msgs = system_message(rec) + alpaca_history(rec) + [
            {"role": "user", "content": alpaca_user(rec["instruction"], rec.get("input"))}]
    else:
        keys = ", ".join(sorted(rec)) or "none"
        raise RecordProblem(f"unknown prompt record format (keys: {keys}); known formats: "
                            f"{'; '.join(PROMPT_FORMATS)}", "unknown format")
    return check_prompt(msgs)


def _parse(rec: Any, where: str) -> list[Prompt]:
    return [Prompt(prompt_messages(rec), where)]


def read_prompts(paths: Union[PathLike, Iterable[PathLike]], *, strict: bool = True) -> DataList:
    """Read prompts from files or folders (.jsonl, .jsonl.gz, .json, .json.gz).

    Returns a list of Prompt with ``.skips`` (SkipCounter) and ``.files``; see the module
    docstring for the formats and the policy.
    """
    return read_records(paths, _parse, strict=strict, what="prompts")
