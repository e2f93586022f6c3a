"""Which rows share a forward pass: length-sorted chunks that waste little compute on padding (RL's rollout and
update passes, reward-model scoring and training, the engine's prefill).

A chunk of rows is one forward over ``rows x width`` tokens, ``width`` = its longest prompt + its longest response
(left-padded prompts, right-padded responses; rl.rollout.RolloutBatch.select trims the rest); a plain sequence is
a prompt with an empty response (:func:`length_groups`). Rows in index order put
short and long prompts together: on the RL benchmark's prompts (mean 40 tokens, a long tail) a chunk of 8 rows
computes ~1.6x the real tokens. Sorting by length and cutting where it pays removes most of that.

:func:`plan_chunks` picks contiguous groups of the length-sorted rows, at most ``max_rows`` each, minimising

    sum over chunks of (rows x width + overhead)

by dynamic programming; ``overhead`` is the fixed cost of one more forward in tokens: kernel launches and Python,
and above all the matrix products' lower efficiency on few rows. Fitting ``time = call + tokens x per-token`` to a
forward + backward of the benchmark models (one thread, 16 to 512 tokens, best of 7) gives a call worth ~61 tokens
at 4 x 128 and ~35 at 6 x 384: :data:`CPU_OVERHEAD` tokens per thread (a product split over threads needs more rows
to keep each busy). On an accelerator extra calls cost more than padded tokens, so the plan keeps the fewest
chunks (ceil(rows / max_rows)) and only sorts. The chunks partition the rows: the update's gradient is the same
sum (up to float rounding), only grouped differently.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

CPU_OVERHEAD = 48.0  # tokens per thread that one more forward call costs on a CPU (see the module docstring)
FEWEST_CHUNKS = 1e9  # the overhead that makes the plan use the fewest chunks


def call_overhead_tokens(device: torch.device | str, threads: Optional[int] = None, sharded: bool = False) -> float:
    """The cost of one more forward call in tokens (see the module docstring); ``threads``: torch's by default.
    ``sharded`` (an FSDP model: each forward gathers its shards with the other ranks, so every rank must make the
    same number of calls, whatever its rows' lengths): the fewest calls."""
    if sharded or torch.device(device).type != "cpu":
        return FEWEST_CHUNKS
    return CPU_OVERHEAD * (threads or torch.get_num_threads())


def plan_chunks(prompt_lens: Sequence[int], response_lens: Sequence[int], max_rows: int,
                overhead: float) -> list[list[int]]:
    """Row indices grouped into chunks of at most ``max_rows`` rows (see the module docstring): rows sorted by
    prompt + response length, cut where ``rows x (max prompt + max response) + overhead`` summed is least.
    (N,), (N,) -> chunks covering 0..N-1 once each, shortest rows first."""
    n = len(prompt_lens)
    if len(response_lens) != n:
        raise ValueError(f"plan_chunks: {n} prompt lengths but {len(response_lens)} response lengths")
    max_rows = max(1, int(max_rows))
    order = sorted(range(n), key=lambda i: (prompt_lens[i] + response_lens[i], prompt_lens[i], i))
    p = [prompt_lens[i] for i in order]
    r = [response_lens[i] for i in order]
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        mp = mr = 0
        for i in range(j - 1, max(j - max_rows, 0) - 1, -1):  # the last chunk is rows i..j-1
            mp, mr = max(mp, p[i]), max(mr, r[i])
            c = best[i] + (j - i) * (mp + mr) + overhead
            if c < best[j]:
                best[j], cut[j] = c, i
    chunks, j = [], n
    while j > 0:
        chunks.append(order[cut[j]:j])
        j = cut[j]
    return chunks[::-1]


def length_groups(lengths: Sequence[int], overhead: float) -> list[list[int]]:
    """Rows of the given lengths grouped for forward passes with little padding (:func:`plan_chunks` with no
    response and no row limit): (N,) -> groups covering 0..N-1 once each, shortest rows first."""
    return plan_chunks(lengths, [0] * len(lengths), max(len(lengths), 1), overhead)
