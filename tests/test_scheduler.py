"""Continuous batching (chatforge/scheduler.py): many requests that join and leave a running batch get exactly
the tokens each gets alone from the engine (greedy, and seeded sampling); cancelled requests free their KV-cache
row at once; the per-request (transformers) path agrees too; sampling and prompt log-probs on hand values."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from chatforge.engine import Engine, sample_next
from chatforge.model.hf_causal import HFCausalLM
from chatforge.generation_request import Request
from chatforge.row_sampling import prompt_logprobs, sample_rows
from chatforge.scheduler import Scheduler
from chatforge.slot_cache import SlotCache
from tests.serve_fixtures import micro_gpt

pytestmark = pytest.mark.timeout(120)
V = 320


def random_requests(n: int, seed: int = 1, max_prompt: int = 30, max_new: int = 40):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        P = int(torch.randint(1, max_prompt, (1,), generator=g))
        out.append((torch.randint(6, V, (P,), generator=g).tolist(), int(torch.randint(1, max_new, (1,), generator=g))))
    return out


@pytest.fixture(scope="module")
def gpt():
    return micro_gpt(V)


def solo(model, prompt, n, **kw):
    return Engine(model).generate([prompt], n, **kw).tokens[0]


def test_concurrent_greedy_equals_each_request_alone(gpt):
    reqs = random_requests(40)
    ref = [solo(gpt, p, n, temperature=0.0) for p, n in reqs]
    # 8 rows for 40 requests: most wait, join a running batch, and leave it at different steps; a short cache
    # forces compactions.
    s = Scheduler(gpt, max_batch=8, cache_len=100)
    hs = [s.submit(Request(p, n, temperature=0.0)) for p, n in reqs]
    s.run_until_idle()
    assert [h.tokens for h in hs] == ref
    assert all(h.finish == "length" for h in hs)
    assert s.compactions > 0 and s.cache.n == 0 and s.cache.length == 0
    assert len({tuple(t) for t in ref}) == len(ref)  # the answers really differ
    # fewer model calls than requests * tokens: the requests were decoded together
    assert s.steps < sum(n for _, n in reqs) / 3


def test_seeded_sampling_equals_the_engine_alone(gpt):
    reqs = random_requests(12, seed=2)
    ref = [solo(gpt, p, n, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(100 + i))
           for i, (p, n) in enumerate(reqs)]
    s = Scheduler(gpt, max_batch=5)
    # greedy neighbours in the same batch change nothing for the sampled rows
    hs = [s.submit(Request(p, n, temperature=0.8, top_p=0.9, seed=100 + i)) for i, (p, n) in enumerate(reqs)]
    others = [s.submit(Request(p, n, temperature=0.0)) for p, n in reqs[:4]]
    s.run_until_idle()
    assert [h.tokens for h in hs] == ref
    assert [h.tokens for h in others] == [solo(gpt, p, n, temperature=0.0) for p, n in reqs[:4]]


def test_stop_ids_and_limits_per_request(gpt):
    prompt = [7, 8, 9, 10]
    free = solo(gpt, prompt, 20, temperature=0.0)
    stop_at = free[5]
    k = free.index(stop_at)
    s = Scheduler(gpt, max_batch=4)
    a = s.submit(Request(prompt, 20, temperature=0.0, stop_ids=[stop_at]))
    b = s.submit(Request(prompt, 3, temperature=0.0))
    c = s.submit(Request(prompt, 0, temperature=0.0))  # nothing to generate: over at once
    d = s.submit(Request(list(range(6, 6 + 90)), 50, temperature=0.0))  # capped at the context: 96 - 90 = 6
    s.run_until_idle()
    assert a.tokens == free[:k + 1] and a.finish == "stop"
    assert b.tokens == free[:3] and b.finish == "length"
    assert c.tokens == [] and c.finish == "length" and c.done
    assert len(d.tokens) == 6 and d.finish == "length"
    with torch.no_grad():
        first = torch.log_softmax(gpt(torch.tensor([prompt]))[0, -1].float(), -1)[free[0]].item()
    assert a.logprobs[0] == pytest.approx(first, abs=1e-5)


def test_bad_requests_are_refused(gpt):
    s = Scheduler(gpt, max_batch=2)
    for req, msg in [(Request([], 5), "empty"), (Request(list(range(6, 102)), 5), "at most 95"),
                     (Request([6], 5, temperature=-1), "temperature"), (Request([6], 5, top_p=0.0), "top_p"),
                     (Request([6], -1), "max_new_tokens")]:
        with pytest.raises(ValueError, match=msg):
            s.submit(req)
    assert s.num_waiting == 0


def test_cancel_mid_stream_frees_the_slot_at_once(gpt):
    s = Scheduler(gpt, max_batch=2).start()
    try:
        seen = []
        first = threading.Event()

        def on_event(ev):
            seen.append(ev)
            if len(seen) == 3:
                first.set()

        h = s.submit(Request([6, 7, 8], 80, temperature=0.0), on_event)
        other = s.submit(Request([9, 10], 60, temperature=0.0))
        assert first.wait(30)
        h.cancel()
        h.wait(30)
        assert h.finish == "cancelled" and 3 <= len(h.tokens) < 80
        assert s.num_active <= 1 and h.row is None  # its row is free while the other request still runs
        other.wait(30)
        assert other.tokens == solo(gpt, [9, 10], 60, temperature=0.0)  # the neighbour was not disturbed
        after = s.submit(Request([6, 7, 8], 5, temperature=0.0)).wait(30)
        assert after.tokens == solo(gpt, [6, 7, 8], 5, temperature=0.0)
        assert s.num_active == 0 and s.cache.n == 0
    finally:
        s.close()


def test_cancel_before_admission_and_close(gpt):
    s = Scheduler(gpt, max_batch=1)
    a = s.submit(Request([6], 10, temperature=0.0))
    b = s.submit(Request([7], 10, temperature=0.0))
    b.cancel()
    s.run_until_idle()
    assert a.finish == "length" and b.finish == "cancelled" and b.tokens == []
    s.start()
    c = s.submit(Request([6], 1000, temperature=0.0))
    s.close()
    assert c.wait(10).finish in ("cancelled", "length")
    with pytest.raises(RuntimeError, match="closed"):
        s.submit(Request([6], 5))


def test_threaded_concurrent_submitters(gpt):
    reqs = random_requests(16, seed=3)
    ref = [solo(gpt, p, n, temperature=0.0) for p, n in reqs]
    s = Scheduler(gpt, max_batch=16).start()
    try:
        out = [None] * len(reqs)

        def client(i):
            p, n = reqs[i]
            out[i] = s.submit(Request(p, n, temperature=0.0)).wait(60).tokens

        ts = [threading.Thread(target=client, args=(i,)) for i in range(len(reqs))]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert out == ref
    finally:
        s.close()


def test_transformers_model_per_request_path():
    from tests.test_hf_models import build_model

    hf = HFCausalLM(build_model("qwen2", V)).eval()
    reqs = random_requests(6, seed=4, max_prompt=20, max_new=12)
    ref = [solo(hf, p, n, temperature=0.0) for p, n in reqs]
    s = Scheduler(hf, max_batch=4)
    assert not s.batched and s.kv_bytes_per_request() is None
    hs = [s.submit(Request(p, n, temperature=0.0)) for p, n in reqs]
    s.run_until_idle()
    assert [h.tokens for h in hs] == ref


def test_slot_cache_rows_join_leave_and_compact():
    c = SlotCache(n_layer=1, rows=3, n_kv_head=1, max_len=8, head_dim=1)

    def prefilled(values, P):
        src = micro_cache(len(values), P)
        for r, vals in enumerate(values):  # left-padded rows: the values sit at the end
            src.k[0, r, 0, P - len(vals):P, 0] = torch.tensor(vals, dtype=torch.float)
            src.valid[r, P - len(vals):P] = True
            src.next_pos[r] = len(vals)
        src.length = P
        return src

    assert c.add_rows(prefilled([[1, 2]], 2)) == [0]
    assert c.add_rows(prefilled([[3, 4, 5]], 3)) == [1]  # longer than `length`: row 0 shifts right by one
    assert c.length == 3 and c.valid.tolist() == [[False, True, True] + [False] * 5, [True] * 3 + [False] * 5]
    assert c.k[0, 0, 0, 1:3, 0].tolist() == [1, 2]
    for step in range(3):  # decode three tokens: row 0 gets 10, 11, 12 and row 1 gets 20, 21, 22
        k = torch.tensor([10.0 + step, 20.0 + step]).view(2, 1, 1, 1)  # (n, Hkv, T, hd)
        c.update(0, k, torch.zeros(2, 1, 1, 1))
        c.advance(None, 1)
    assert c.length == 6 and c.next_pos.tolist() == [5, 6]
    assert c.remove_row(0) == 1  # row 1 moves into row 0
    assert c.n == 1 and c.k[0, 0, 0, :6, 0].tolist() == [3, 4, 5, 20, 21, 22]
    c.valid_all[0, 1] = False  # pretend slot 1 was never a token: compaction squeezes it out
    c.compact()
    assert c.length == 5 and c.k[0, 0, 0, :5, 0].tolist() == [3, 5, 20, 21, 22] and c.valid[0, :5].all()
    assert c.nbytes_per_row() == 2 * 1 * 1 * 8 * 1 * 4


def micro_cache(B, P):
    from chatforge.model.inference import KVCache

    return KVCache(1, B, 1, P, 1)


def test_sample_rows_hand_values_and_engine_law():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    logits = probs.log()
    # top_p 0.6 keeps {0, 1} of row 0 (0.5 < 0.6, then 0.8), renormalised to 0.625 / 0.375
    g = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    u0 = torch.rand(1, generator=torch.Generator().manual_seed(0), dtype=torch.float64).item()
    nxt, logp = sample_rows(logits, torch.tensor([1.0, 0.0]), torch.tensor([0.6, 1.0]), g)
    assert nxt[0].item() == (0 if u0 < 0.625 else 1)
    assert nxt[1].item() == 2  # temperature 0: greedy
    assert torch.allclose(logp.exp(), probs, atol=1e-6)
    # the same draws as the engine's sample_next with the same generator, row by row
    torch.manual_seed(3)
    x = torch.randn(6, 50) * 3
    temps, tops = [0.7, 1.0, 1.3, 0.5, 1.0, 2.0], [0.9, 1.0, 0.5, 1.0, 0.95, 0.8]
    gens = [torch.Generator().manual_seed(10 + i) for i in range(6)]
    got, _ = sample_rows(x, torch.tensor(temps), torch.tensor(tops), gens)
    for i in range(6):
        want, _ = sample_next(x[i:i + 1], temps[i], None, tops[i] if tops[i] < 1 else None,
                              torch.Generator().manual_seed(10 + i))
        assert got[i].item() == want.item()


def test_prompt_logprobs_equal_a_full_forward(gpt):
    ids = [6, 50, 70, 90, 11]
    lps, tops = prompt_logprobs(gpt, ids, top=2)
    with torch.no_grad():
        ref = torch.log_softmax(gpt(torch.tensor([ids]))[0].float(), -1)
    assert lps[0] is None and tops[0] is None
    for t in range(1, len(ids)):
        assert lps[t] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-6)
        best = ref[t - 1].topk(2)
        assert [i for i, _ in tops[t]] == best.indices.tolist()
    assert math.isclose(sum(math.exp(v) for v in ref[0].tolist()), 1.0, rel_tol=1e-5)


def test_a_failing_forward_ends_its_requests_and_the_scheduler_goes_on(gpt, monkeypatch):
    s = Scheduler(gpt, max_batch=4).start()
    try:
        real = type(gpt).forward
        calls = {"n": 0}

        def flaky(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] in (1, 4):  # the first prefill, then a decode step
                raise RuntimeError("device lost")
            return real(self, *a, **kw)

        monkeypatch.setattr(type(gpt), "forward", flaky)
        a = s.submit(Request([6, 7], 10, temperature=0.0)).wait(30)
        assert a.error is not None and "device lost" in a.error and a.tokens == []
        b = s.submit(Request([6, 7], 10, temperature=0.0)).wait(30)  # prefill ok, 2 decodes, then a failure
        assert "device lost" in b.error and s.num_active == 0 and s.cache.n == 0
        monkeypatch.setattr(type(gpt), "forward", real)
        c = s.submit(Request([6, 7], 10, temperature=0.0)).wait(30)
        assert c.error is None and c.tokens == solo(gpt, [6, 7], 10, temperature=0.0)
    finally:
        s.close()
