"""Tokenised preference pairs, shared by the reward-model and DPO stages.

A pair is ``prompt`` ids (``render_prompt``: ``<|endoftext|>...<|assistant|>``) plus two
responses (``render_response``: ``text...<|end|>``). A model sees ``prompt + chosen`` and
``prompt + rejected``; both end exactly at ``<|end|>``, which is where a reward model reads its
score (and where transformers' sequence classifier reads it too).

Overlong policy: a pair whose longer side (prompt + longer response) exceeds the context is
dropped, counted and reported, whatever ``data.overlong`` says. Pairs are never truncated,
because cutting a response would remove the ``<|end|>`` the reward is read at, and cutting the
prompt would silently change what the answers answer.

Batches put the chosen and rejected sequences of each pair in one tensor of ``2B`` rows
(chosen rows first, then rejected rows in the same order), right-padded, so one forward pass
scores both. Batching is length-bucketed on ``max(len(chosen seq), len(rejected seq))``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from chatforge.data.batching import pad
from chatforge.data.preferences import PreferencePair, read_preferences
from chatforge.data.records import DataError, fingerprint, split_train_val
from chatforge.tokenizer import ChatTokenizer, ConversationError, render_prompt, render_response

log = logging.getLogger("chatforge.data")


@dataclass
class TokenPair:
    """One preference pair as token ids. ``chosen``/``rejected`` are response ids ending in <|end|>."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    source: str  # "file:line"

    @property
    def length(self) -> int:
        """Length of the longer of the two full sequences (the bucketing key)."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


@dataclass
class PairBatch:
    """2B rows: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected of the same pairs.

    ids (2B, T) right-padded with pad_id; attention_mask (2B, T) 1 = real token;
    response_mask (2B, T) 1 on response tokens (the answer and its <|end|>), 0 on prompt and padding.
    """

    ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device) -> "PairBatch":
        return PairBatch(*(t.to(device, non_blocking=True) for t in (self.ids, self.attention_mask, self.response_mask)))


@dataclass
class PairData:
    train: list[TokenPair]
    val: list[TokenPair]
    meta: dict = field(default_factory=dict)


def tokenize_pair(tok: ChatTokenizer, pair: PreferencePair) -> TokenPair:
    """PreferencePair -> TokenPair; a rendering problem raises DataError at the pair's file:line."""
    try:
        return TokenPair(render_prompt(tok, pair.prompt), render_response(tok, pair.chosen),
                         render_response(tok, pair.rejected), pair.source)
    except ConversationError as e:
        file, _, line = pair.source.rpartition(":")
        raise DataError(file or pair.source, int(line) if line.isdigit() else None, str(e)) from None


def tokenize_pairs(tok: ChatTokenizer, pairs: Sequence[PreferencePair], max_len: int) -> tuple[list[TokenPair], list[str]]:
    """Tokenise pairs and drop those longer than ``max_len`` tokens -> (kept, sources of the dropped)."""
    kept, dropped = [], []
    for p in pairs:
        tp = tokenize_pair(tok, p)
        if tp.length <= max_len:
            kept.append(tp)
        else:
            dropped.append(p.source)
    return kept, dropped


def load_pair_data(data_cfg, tok: ChatTokenizer, max_len: int, *, verbose: bool = True) -> PairData:
    """Read, split and tokenise the preference data of ``cfg.data``.

    Held out: ``data.val_path`` when given, else a ``val_fraction`` split (seeded by ``data.seed``).
    ``data.max_examples`` caps the training pairs. Overlong pairs are dropped and counted (see module doc).
    ``meta`` holds file names, fingerprint, counts and skip/drop reasons for chatforge.json.
    """
    if not data_cfg.path:
        raise DataError("(no paths)", None, "no preference data given; pass --data.path=FILE")
    pairs = read_preferences(data_cfg.path, strict=data_cfg.strict)
    skips = pairs.skips.as_dict()
    if data_cfg.val_path:
        val_pairs = read_preferences(data_cfg.val_path, strict=data_cfg.strict)
        for k, v in val_pairs.skips.as_dict().items():
            skips[f"val: {k}"] = v
        train_pairs = list(pairs)
    elif data_cfg.val_fraction > 0:
        train_pairs, val_pairs = split_train_val(pairs, data_cfg.val_fraction, data_cfg.seed)
    else:
        train_pairs, val_pairs = list(pairs), []
    if data_cfg.max_examples:
        train_pairs = train_pairs[: data_cfg.max_examples]
    if verbose and sum(skips.values()):
        print(f"preference pairs: {pairs.skips.summary()}")
    train, drop_t = tokenize_pairs(tok, train_pairs, max_len)
    val, drop_v = tokenize_pairs(tok, val_pairs, max_len)
    if drop_t or drop_v:
        msg = (f"preference pairs: dropped {len(drop_t)} train and {len(drop_v)} held-out pairs longer than the "
               f"context of {max_len} tokens (e.g. {', '.join((drop_t + drop_v)[:3])}); raise model.block_size "
               f"to keep them")
        log.warning(msg)
        if verbose:
            print(msg)
    if not train:
        raise DataError(", ".join(map(str, data_cfg.path)), None,
                        f"no training pairs fit the context of {max_len} tokens ({len(drop_t)} dropped as overlong)")
    files = [str(f) for f in pairs.files]
    meta = {
        "files": files,
        "fingerprint": fingerprint(data_cfg.path),
        "train_pairs": len(train),
        "val_pairs": len(val),
        "skipped": skips,
        "dropped_overlong": {"train": len(drop_t), "val": len(drop_v)},
        "tokenizer_fingerprint": tok.fingerprint(),
    }
    return PairData(train, val, meta)


def collate_pairs(pairs: Sequence[TokenPair], pad_id: int, length: Optional[int] = None) -> PairBatch:
    """Stack pairs into one right-padded batch of 2B rows (see :class:`PairBatch`)."""
    seqs, resp = [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            r = getattr(p, side)
            seqs.append(p.prompt + r)
            resp.append([0] * len(p.prompt) + [1] * len(r))
    ids = pad(seqs, pad_id, "right", length)  # (2B, T)
    attn = pad([[1] * len(s) for s in seqs], 0, "right", length)  # (2B, T)
    response_mask = pad(resp, 0, "right", length)  # (2B, T)
    return PairBatch(ids, attn, response_mask)


@dataclass
class PackedPairs:
    """B pairs, one row each: prompt, chosen, rejected (the prompt once; a model reads the row with
    ``branches``, see model.gpt.branch_layout). ids (B, T) right-padded with pad_id; branches (B, T): 0 prompt,
    1 chosen, 2 rejected, -1 padding; prev (B, T): the slot whose output predicts each token (the slot before it,
    or the prompt's last for a branch's first token)."""

    ids: torch.Tensor
    branches: torch.Tensor
    prev: torch.Tensor

    def to(self, device) -> "PackedPairs":
        return PackedPairs(*(t.to(device, non_blocking=True) for t in (self.ids, self.branches, self.prev)))


def collate_packed(pairs: Sequence[TokenPair], pad_id: int) -> PackedPairs:
    """Pairs -> :class:`PackedPairs`, rows right-padded to the longest prompt + chosen + rejected."""
    rows, branch, prev = [], [], []
    for p in pairs:
        P, C, R = len(p.prompt), len(p.chosen), len(p.rejected)
        rows.append(p.prompt + p.chosen + p.rejected)
        branch.append([0] * P + [1] * C + [2] * R)
        prev.append([max(j - 1, 0) for j in range(P + C)] + [P - 1] + [P + C + j - 1 for j in range(1, R)])
    T = max(len(r) for r in rows)
    return PackedPairs(pad(rows, pad_id, "right", T), pad(branch, -1, "right", T), pad(prev, 0, "right", T))


@dataclass
class PairSequences:
    """The distinct sequences of B pairs, each once (pairs of one prompt share answers: six answers make
    fifteen pairs). ids (U, T) right-padded with pad_id; attention_mask (U, T) 1 = real token;
    chosen (B,) and rejected (B,): the row of ids holding each pair's prompt+chosen / prompt+rejected."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor

    def to(self, device) -> "PairSequences":
        return PairSequences(*(t.to(device, non_blocking=True) for t in (self.ids, self.attention_mask, self.chosen,
                                                                           self.rejected)))

    @property
    def tokens(self) -> torch.Tensor:
        """Tokens of the distinct sequences, () long."""
        return self.attention_mask.sum()


@dataclass
class PromptRows:
    """Sequences prompt + answer as one row per distinct prompt: the prompt once, then each of its answers as a
    branch of it (a model reads the row with ``branches``, see model.gpt.branch_layout). ids (G, T) right-padded
    with pad_id; branches (G, T): 0 prompt, k the k-th answer, -1 padding; row (U,) and last (U,): the row and
    slot of each sequence's last token; lengths (U,): each sequence's length, prompt + answer. For pairs
    (:func:`collate_prompt_rows`) the sequences are the distinct ones and chosen (B,) / rejected (B,) index them."""

    ids: torch.Tensor
    branches: torch.Tensor
    row: torch.Tensor
    last: torch.Tensor
    lengths: torch.Tensor
    chosen: Optional[torch.Tensor] = None
    rejected: Optional[torch.Tensor] = None

    def to(self, device) -> "PromptRows":
        return PromptRows(*(None if t is None else t.to(device, non_blocking=True)
                            for t in (self.ids, self.branches, self.row, self.last, self.lengths, self.chosen,
                                      self.rejected)))

    @property
    def tokens(self) -> torch.Tensor:
        """Tokens of the sequences (as :class:`PairSequences` counts them), () long."""
        return self.lengths.sum()


def branch_rows(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> PromptRows:
    """(prompt, answer) sequences -> :class:`PromptRows`, a row per distinct prompt in order of first appearance,
    its answers as branches in the order given (a sequence given twice is two branches)."""
    answers: dict[tuple[int, ...], list[tuple[Sequence[int], int]]] = {}  # prompt -> [(answer, sequence index)]
    for u, (prompt, ans) in enumerate(seqs):
        if len(prompt) == 0:
            raise ValueError(f"branch_rows: sequence {u} has an empty prompt")
        answers.setdefault(tuple(prompt), []).append((ans, u))
    rows, branch = [], []
    row, last = [0] * len(seqs), [0] * len(seqs)
    for g, (prompt, mine) in enumerate(answers.items()):
        ids, br = list(prompt), [0] * len(prompt)
        for k, (ans, u) in enumerate(mine, start=1):
            ids += list(ans)
            br += [k] * len(ans)
            row[u], last[u] = g, len(ids) - 1 if len(ans) else len(prompt) - 1
        rows.append(ids)
        branch.append(br)
    T = max(len(r) for r in rows)
    return PromptRows(pad(rows, pad_id, "right", T), pad(branch, -1, "right", T), torch.tensor(row),
                      torch.tensor(last), torch.tensor([len(p) + len(a) for p, a in seqs]))


def collate_prompt_rows(pairs: Sequence[TokenPair], pad_id: int) -> PromptRows:
    """Pairs -> :class:`PromptRows` of their distinct sequences (in order of first appearance: every chosen, then
    every rejected), with each pair's chosen and rejected sequence."""
    index: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}

    def seq(p: TokenPair, side: str) -> int:
        return index.setdefault((tuple(p.prompt), tuple(getattr(p, side))), len(index))

    chosen = [seq(p, "chosen") for p in pairs]
    rejected = [seq(p, "rejected") for p in pairs]
    rows = branch_rows(list(index), pad_id)
    rows.chosen, rows.rejected = torch.tensor(chosen), torch.tensor(rejected)
    return rows


def collate_unique(pairs: Sequence[TokenPair], pad_id: int) -> PairSequences:
    """Stack the distinct prompt+response sequences of ``pairs`` into one right-padded batch (see
    :class:`PairSequences`), in order of first appearance."""
    rows: dict[tuple[int, ...], int] = {}

    def row(seq: list[int]) -> int:
        return rows.setdefault(tuple(seq), len(rows))

    chosen = [row(p.prompt + p.chosen) for p in pairs]
    rejected = [row(p.prompt + p.rejected) for p in pairs]
    seqs = list(rows)
    ids = pad(seqs, pad_id, "right")  # (U, T)
    attn = pad([[1] * len(s) for s in seqs], 0, "right")  # (U, T)
    return PairSequences(ids, attn, torch.tensor(chosen), torch.tensor(rejected))


def pair_lengths(pairs: Sequence[TokenPair]) -> list[int]:
    return [p.length for p in pairs]
