"""A scalar head on the Llama trunk: per-token values (PPO critic) or sequence rewards (reward model).

Module names equal transformers' ``LlamaForSequenceClassification`` with ``num_labels=1``
(``model.*`` + ``score.weight`` of shape (1, d), no bias), so the state dict is an HF one.
A sequence's reward is the score at its rightmost real token, as transformers reads it, for
left- and right-padded batches alike (:func:`gather_last`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from chatforge.config import ModelConfig
from chatforge.data.chunks import call_overhead_tokens, length_groups
from chatforge.model.gpt import GPT, Trunk, init_trunk


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask, 1 = real token -> (B,) index of the rightmost real token (0 for an all-pad row)."""
    T = attention_mask.shape[1]
    idx = torch.arange(T, device=attention_mask.device)  # (T,)
    return (idx * (attention_mask != 0).long()).argmax(dim=1)  # (B,)


def gather_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values (B, T), mask (B, T) -> (B,) the value at each row's rightmost real token."""
    i = last_token_index(attention_mask)  # (B,)
    return values.gather(1, i[:, None]).squeeze(1)  # (B,)


@torch.inference_mode()
def score_sequences(model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Scores (N,) fp32 on the CPU of whole token sequences, each read at its last token: the one scorer of
    reward models (the RM's normalisation statistics, RL rewards, `chatforge score`).

    Length-sorted batches of ``batch_size``, right-padded: with causal attention the padding cannot change the
    real tokens, so no mask is needed. ``model``: ids (b, T) -> per-token scalars (b, T).
    """
    device = next(model.parameters()).device  # read each call: the caller may have offloaded the model
    out = torch.empty(len(seqs), dtype=torch.float32)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths share a batch
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        rows = [torch.tensor(list(seqs[i]), dtype=torch.long) for i in idx]
        ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id).to(device)  # (b, T)
        mask = nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).to(device)  # (b, T)
        out[idx] = gather_last(model(ids).float(), mask).cpu()  # (b,)
    return out


def branch_scores(model: "ScalarModel", rows) -> torch.Tensor:
    """Scores (U,) fp32 of the sequences laid out as data.pairs.PromptRows (a row per prompt, its answers branching
    from it), each read at its last token: the prompt computed once for all its answers. Rows of similar length go
    through the model together (data.chunks.length_groups), each group cut to its longest."""
    dev = rows.ids.device
    lengths = (rows.branches >= 0).sum(1).tolist()  # (G,)
    row, last = rows.row.tolist(), rows.last.tolist()  # (U,)
    parts, order = [], []
    for group in length_groups(lengths, call_overhead_tokens(dev)):
        T = max(lengths[g] for g in group)
        sel = torch.tensor(group, device=dev)
        h = model.model(rows.ids[sel, :T], branches=rows.branches[sel, :T])  # (g, T, C)
        local = {g: j for j, g in enumerate(group)}
        seqs = [u for u in range(len(row)) if row[u] in local]  # the sequences these rows hold
        at = torch.tensor([[local[row[u]], last[u]] for u in seqs], device=dev)  # (u, 2): row, slot
        parts.append(model.score(h[at[:, 0], at[:, 1]]).squeeze(-1).float())  # (u,)
        order += seqs
    return torch.cat(parts)[torch.argsort(torch.tensor(order, device=dev))]  # (U,) in sequence order


class ScalarModel(nn.Module):
    """Trunk + ``score = Linear(d, 1, bias=False)``: ids (B, T) -> per-token scalars (B, T), fp32."""

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.model = Trunk(cfg, vocab_size)
        self.score = nn.Linear(cfg.n_embd, 1, bias=False)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Trunk as in :meth:`GPT.init_weights`; the score head as a reward head (:meth:`init_score`)."""
        init_trunk(self.model, std)
        self.init_score()

    def init_score(self, std: Optional[float] = None) -> None:
        """Score head ~ N(0, std). None = 1/sqrt(d+1) (reward-model convention); 0 = zeros (PPO critic)."""
        if std is None:
            std = 1.0 / math.sqrt(self.cfg.n_embd + 1)
        if std == 0:
            nn.init.zeros_(self.score.weight)
        else:
            nn.init.normal_(self.score.weight, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """idx (B, T), attention_mask (B, T) 1 = real -> values (B, T) in fp32."""
        h = self.model(idx, attention_mask)  # (B, T, C)
        return self.score(h).squeeze(-1).float()  # (B, T)

    @classmethod
    def from_trunk(cls, gpt: GPT, score_std: Optional[float] = None) -> "ScalarModel":
        """A new ScalarModel whose trunk is a copy of ``gpt.model`` (same device and dtype);
        the score head is initialised by :meth:`init_score` with ``score_std``."""
        ref = next(gpt.parameters())
        m = cls(gpt.cfg, gpt.vocab_size).to(device=ref.device, dtype=ref.dtype)
        m.model.load_state_dict(gpt.model.state_dict())
        m.init_score(score_std)
        return m
