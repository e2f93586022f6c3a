"""SFT data: conversations -> token ids + loss masks -> length-bucketed, right-padded batches.

Pipeline (see :func:`build_sft_data`):

1. ``read_conversations`` parses every record (all SFT formats; bad records raise DataError
   naming file and line, or are counted skips with ``data.strict=false``).
2. Held-out split: ``data.val_path`` files when given, else ``split_train_val`` of the
   conversations with ``data.val_fraction`` / ``data.seed``.
3. Each conversation is rendered by the one chat-format function
   (``tokenizer.render_conversation``) to ``(ids, mask)``; mask = 1 on assistant content
   and its ``<|end|>``.
4. Overlong policy (``data.overlong``), for conversations of more than ``block_size + 1``
   ids (a training row is ``ids[:-1]`` -> ``ids[1:]``, at most ``block_size`` positions):
   ``truncate`` keeps the prefix, ``drop`` drops the example. Both are counted; a truncated
   example left with no response token to learn from is dropped and counted too.
5. Batches: :class:`SFTLoader` draws global batches from ``BucketBatcher`` (examples of similar
   length together, the same for any world size) and right-pads each micro-batch to its
   longest row. Inputs ``x = ids[:-1]``, targets ``y = ids[1:]``, loss mask ``m = mask[1:]``
   (the mask shifted with the targets: position t is trained when token t+1 is a response token).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch

from chatforge.data.batching import BucketBatcher, eval_batches, pad, padding_fraction
from chatforge.data.conversations import Conversation, read_conversations
from chatforge.data.records import DataError, fingerprint, split_train_val
from chatforge.errors import UserInputError
from chatforge.tokenizer import ChatTokenizer, ConversationError, render_conversation, render_prompt

log = logging.getLogger("chatforge.data")

OVERLONG = ("truncate", "drop")


@dataclass
class SFTExample:
    ids: list[int]
    """Rendered conversation, BOS included (length <= block_size + 1)."""
    mask: list[int]
    """1 where ids[t] is an assistant content token or its <|end|>."""
    source: str
    """file:line (file:line#k for one instance of a multi-instance record)."""


@dataclass
class TokenizeStats:
    """What happened to the conversations on their way to examples (reported in chatforge.json)."""

    conversations: int = 0
    examples: int = 0
    truncated: int = 0
    """Overlong conversations kept as their prefix (policy 'truncate')."""
    dropped_overlong: int = 0
    """Overlong conversations dropped (policy 'drop')."""
    dropped_no_response: int = 0
    """Truncated conversations whose prefix held no response token (dropped)."""
    skipped: int = 0
    """Conversations the renderer rejected, with data.strict=false."""

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def split_source(source: str) -> tuple[str, Optional[int]]:
    """'file:line' or 'file:line#k' -> (file, line)."""
    path, _, rest = source.rpartition(":")
    try:
        return path, int(rest.split("#")[0])
    except ValueError:
        return source, None


def tokenize_conversations(convs: Sequence[Conversation], tok: ChatTokenizer, max_len: int,
                           overlong: str = "truncate", strict: bool = True) -> tuple[list[SFTExample], TokenizeStats]:
    """Render conversations to examples of at most ``max_len`` ids under the overlong policy.

    A conversation the renderer rejects raises DataError with its file:line (or is counted as
    skipped when ``strict`` is False).
    """
    if overlong not in OVERLONG:
        raise ValueError(f"data.overlong must be one of {', '.join(OVERLONG)}, got {overlong!r}")
    stats = TokenizeStats(conversations=len(convs))
    out: list[SFTExample] = []
    for c in convs:
        try:
            ids, mask = render_conversation(tok, c.messages)
        except ConversationError as e:
            if strict:
                f, line = split_source(c.source)
                raise DataError(f, line, f"cannot render conversation: {e}", "bad conversation") from None
            stats.skipped += 1
            continue
        if len(ids) > max_len:
            if overlong == "drop":
                stats.dropped_overlong += 1
                continue
            ids, mask = ids[:max_len], mask[:max_len]
            if not any(mask[1:]):
                stats.dropped_no_response += 1
                continue
            stats.truncated += 1
        out.append(SFTExample(ids, mask, c.source))
    stats.examples = len(out)
    return out, stats


def conversation_prompt(c: Conversation) -> list[dict]:
    """The context of a conversation's last assistant turn (what a model is asked to answer)."""
    last = max(i for i, m in enumerate(c.messages) if m["role"] == "assistant")
    return c.messages[:last]


@dataclass
class SFTData:
    train: list[SFTExample]
    val: list[SFTExample]
    val_conversations: list[Conversation]
    """Held-out conversations (their prompts seed the eval samples)."""
    meta: dict = field(default_factory=dict)
    """Files, fingerprints and counts for chatforge.json."""


def build_sft_data(cfg, tok: ChatTokenizer, block_size: int) -> SFTData:
    """Read, split and tokenise the SFT data named by ``cfg.data`` (see the module docstring)."""
    dc = cfg.data
    if not dc.path:
        raise DataError("(no paths)", None, "sft needs conversation files: --data.path=FILE[,FILE...]")
    convs = read_conversations(dc.path, strict=dc.strict)
    skips: dict = {"train": convs.skips.as_dict()}
    if dc.val_path:
        val_convs = read_conversations(dc.val_path, strict=dc.strict)
        skips["val"] = val_convs.skips.as_dict()
        train_convs = list(convs)
    else:
        train_convs, val_convs = split_train_val(list(convs), dc.val_fraction, dc.seed)
    if dc.max_examples:
        train_convs = train_convs[: dc.max_examples]
    max_len = block_size + 1  # x = ids[:-1] has at most block_size positions
    train, tstats = tokenize_conversations(train_convs, tok, max_len, dc.overlong, dc.strict)
    val, vstats = tokenize_conversations(val_convs, tok, max_len, dc.overlong, dc.strict)
    if not train:
        raise DataError(", ".join(map(str, dc.path)), None,
                        f"no training examples left after the overlong policy ({dc.overlong}, block_size "
                        f"{block_size}): {tstats.as_dict()}")
    for name, st in (("train", tstats), ("val", vstats)):
        if st.truncated or st.dropped_overlong or st.dropped_no_response or st.skipped:
            log.warning("sft %s data: %d conversations longer than %d tokens were truncated, %d dropped "
                        "(policy %s), %d left without response tokens after truncation and dropped, %d skipped",
                        name, st.truncated, max_len, st.dropped_overlong, dc.overlong, st.dropped_no_response,
                        st.skipped)
    meta = {
        "files": [str(p) for p in convs.files],
        "fingerprint": fingerprint(dc.path),
        "val_files": [str(p) for p in val_convs.files] if dc.val_path else [],
        "val_fingerprint": fingerprint(dc.val_path) if dc.val_path else None,
        "tokenizer_fingerprint": tok.fingerprint(),
        "overlong_policy": dc.overlong,
        "train": tstats.as_dict(),
        "val": vstats.as_dict(),
        "skipped_records": skips,
        "train_tokens": sum(len(e.ids) - 1 for e in train),
        "train_response_tokens": sum(sum(e.mask[1:]) for e in train),
        "val_tokens": sum(len(e.ids) - 1 for e in val),
    }
    return SFTData(train, val, list(val_convs), meta)


# ----------------------------------------------------------------------------- batches


def collate(examples: Sequence[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (x, y, m), each (B, T) with T = longest example - 1: inputs, targets, loss mask."""
    x = pad([e.ids[:-1] for e in examples], pad_id)  # (B, T)
    y = pad([e.ids[1:] for e in examples], pad_id)  # (B, T) next tokens
    m = pad([e.mask[1:] for e in examples], 0)  # (B, T) 1 = a response token to predict
    return x, y, m


class SFTLoader:
    """This rank's micro-batches, step after step; its position is all a checkpoint needs."""

    def __init__(self, examples: Sequence[SFTExample], batch_size: int, grad_accum: int, pad_id: int, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.examples, self.pad_id = list(examples), pad_id
        lengths = [len(e.ids) - 1 for e in self.examples]
        self.batcher = BucketBatcher(lengths, batch_size, grad_accum, seed=seed, rank=rank, world_size=world_size)

    def next(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``grad_accum`` micro-batches (x, y, m) for one optimizer step."""
        return [collate([self.examples[i] for i in idx], self.pad_id) for idx in self.batcher.next()]

    def expected_padding(self) -> float:
        """Padding fraction of one epoch when each micro-batch is padded to its longest row."""
        b = self.batcher
        lengths = b.lengths
        micro = [g[k : k + b.B] for g in b._epoch_batches(0) for k in range(0, len(g), b.B)]
        return padding_fraction(micro, lengths)

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.batcher.load_state_dict(s)


def val_micro_batches(examples: Sequence[SFTExample], batch_size: int, pad_id: int, rank: int = 0,
                      world_size: int = 1, max_batches: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Deterministic held-out batches (sorted by length), this rank's share."""
    lengths = [len(e.ids) - 1 for e in examples]
    for idx in eval_batches(lengths, batch_size, rank, world_size, max_batches):
        yield collate([examples[i] for i in idx], pad_id)


def prompt_ids(tok: ChatTokenizer, messages: list[dict], source: str = "eval prompt") -> list[int]:
    """Generation prompt ids of a message list (ending with <|assistant|>)."""
    try:
        return render_prompt(tok, messages)
    except ConversationError as e:
        raise UserInputError(f"{source}: {e}") from None
