"""Length-sorted chunks for RL forward passes (chatforge/data/chunks.py): the plan, and that the passes placed by it
give the numbers of one unchunked pass."""

from __future__ import annotations

import pytest
import torch

from chatforge.config import ModelConfig
from chatforge.model.gpt import GPT
from chatforge.data.chunks import FEWEST_CHUNKS, call_overhead_tokens, plan_chunks
from chatforge.next_token_logits import next_token_logits, plain_gpt
from chatforge.rl.rollout import build_batch, chunked, response_logits, response_logprobs

PROMPTS, RESPONSES = [10, 100, 12, 98], [5, 5, 5, 5]  # sorted by length: rows 0 (15), 2 (17), 3 (103), 1 (105)


def test_plan_by_hand():
    # no call overhead: every row alone costs 15 + 17 + 103 + 105 = 240; any pair pads (0 and 2: 2 x 17 = 34 > 32)
    assert plan_chunks(PROMPTS, RESPONSES, 4, 0.0) == [[0], [2], [3], [1]]
    # overhead 50: singletons 240 + 200 = 440; {0,2} {3,1}: 34 + 2 x 105 + 100 = 344; all four: 4 x 105 + 50 = 470
    assert plan_chunks(PROMPTS, RESPONSES, 4, 50.0) == [[0, 2], [3, 1]]
    assert plan_chunks(PROMPTS, RESPONSES, 4, FEWEST_CHUNKS) == [[0, 2, 3, 1]]  # one call, sorted
    assert plan_chunks(PROMPTS, RESPONSES, 3, FEWEST_CHUNKS) in ([[0, 2], [3, 1]], [[0], [2, 3, 1]])  # two calls
    assert plan_chunks(PROMPTS, RESPONSES, 3, FEWEST_CHUNKS) == [[0, 2], [3, 1]]  # the one with less padding
    assert plan_chunks(PROMPTS, RESPONSES, 1, FEWEST_CHUNKS) == [[0], [2], [3], [1]]
    # the width of a chunk is its longest prompt + its longest response (left-padded prompts)
    assert plan_chunks([10, 1], [1, 10], 2, 0.0) == [[1], [0]]  # together: 2 x 20 = 40 > 11 + 11 (ties: shorter prompt first)
    assert plan_chunks([], [], 4, 0.0) == []
    with pytest.raises(ValueError, match="2 prompt lengths but 1"):
        plan_chunks([1, 2], [1], 4, 0.0)


def test_call_overhead_tokens():
    assert call_overhead_tokens("cpu", threads=1) == 48.0 and call_overhead_tokens("cpu", threads=2) == 96.0
    assert call_overhead_tokens("meta") == FEWEST_CHUNKS  # an accelerator: fewest calls, sorted


@pytest.mark.parametrize("overhead", [0.0, 8.0, FEWEST_CHUNKS])
def test_chunked_passes_equal_one_pass(overhead):
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), 50).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 50, (n,), generator=g).tolist() for n in (3, 20, 4, 18, 2)]
    responses = [torch.randint(5, 50, (n,), generator=g).tolist() for n in (6, 2, 9, 5, 1)]
    batch = build_batch(prompts, responses, 0, 1)
    with torch.no_grad():
        whole, _ = response_logprobs(model, batch, 1.0)  # (B, R): one pass, index order
        parts = chunked(batch, 3, lambda b: response_logprobs(model, b, 1.0)[0], overhead)
    torch.testing.assert_close(parts, whole, atol=2e-5, rtol=0)
    assert (parts[batch.response_mask == 0] == 0).all()


def test_response_logits_run_the_head_on_response_positions_only():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64), 50).eval()
    batch = build_batch([[5, 6, 7], [8, 9, 10, 11, 12]], [[13, 14], [15, 16, 17, 18]], 0, 1)  # P 5, R 4
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    with torch.no_grad():
        fast = response_logits(model, batch)  # (B, R, V)
        hook.remove()
        full = model(batch.input_ids, attention_mask=batch.attention_mask)[:, 4:-1]  # the whole forward, sliced
    assert seen == [(2, 4, 32)]  # the head saw the R = 4 scoring positions, not P + R = 9
    torch.testing.assert_close(fast, full, atol=1e-6, rtol=0)
    wrapped = torch.nn.Sequential()  # any other module type: its whole forward
    assert plain_gpt(wrapped) is None and plain_gpt(model) is model


def test_rows_sharing_a_prompt_are_read_as_one_row_with_the_same_log_probs_and_gradient():
    """GRPO's groups: a native GPT reads a row per prompt, its responses branching from it; the response logits,
    log-probs and gradient equal those of the rows read apart, and the update's chunks keep a prompt's rows
    together (unless a prompt has more rows than a chunk may hold)."""
    from chatforge.rl.rollout import branch_response_logits, row_chunks

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64), 50)
    g = torch.Generator().manual_seed(4)
    ids = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    p1, p2 = ids(6), ids(11)
    prompts = [p1, p1, p2, p1, p2, p2]
    batch = build_batch(prompts, [ids(n) for n in (3, 7, 1, 5, 9, 2)], 0, 99)  # 99: no end id in the responses
    packed = branch_response_logits(model, batch)  # (6, 9, 50)
    apart = next_token_logits(model, batch.input_ids, batch.prompt_len, batch.attention_mask)  # row by row
    m = batch.response_mask.bool()
    torch.testing.assert_close(packed[m], apart[m], atol=1e-5, rtol=1e-5)
    w = torch.randn(m.shape, generator=g)
    lp_packed = response_logprobs(model, batch, 1.0)[0]  # through response_logits: the packed path
    (lp_packed * w).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    targets = batch.input_ids[:, batch.prompt_len:]
    lp_apart = torch.log_softmax(apart, -1).gather(-1, targets[..., None])[..., 0] * batch.response_mask
    torch.testing.assert_close(lp_packed, lp_apart, atol=1e-5, rtol=1e-5)
    (lp_apart * w).sum().backward()
    for a, b in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    chunks = row_chunks(batch, range(6), 4, 8.0, by_prompt=True)
    assert sorted(sorted(c.tolist()) for c in chunks) == [[0, 1, 3], [2, 4, 5]]
    assert max(len(c) for c in row_chunks(batch, range(6), 2, 8.0, by_prompt=True)) <= 2  # groups of 3 > 2: apart
