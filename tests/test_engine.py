"""Engine: KV-cached batched generation equals naive full forwards and transformers' generate."""

import contextlib

import pytest
import torch
from transformers import LlamaForCausalLM

from chatforge.config import ModelConfig
from chatforge.data.chunks import call_overhead_tokens, length_groups
from chatforge.engine import Engine, draw, filter_logits, left_padded, prefill
from chatforge.model.gpt import GPT
from chatforge.model.hf import save_model

V = 300
PAD = 1


def make_gpt(seed=0, std=0.15, **kw) -> GPT:
    base = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64, tie_embeddings=False)
    base.update(kw)
    torch.manual_seed(seed)
    m = GPT(ModelConfig(**base), V)
    m.init_weights(std)  # a larger init: peaked, varied next-token distributions
    return m.eval()


def prompts():
    torch.manual_seed(5)
    return [torch.randint(2, V, (n,)).tolist() for n in (7, 3, 12, 1)]


@torch.no_grad()
def naive_greedy(m, prompt, n):
    """Reference: a full forward over the whole sequence for every new token."""
    seq, device = list(prompt), next(m.parameters()).device
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq], device=device))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_equals_naive_full_forward_loop():
    m = make_gpt()
    res = Engine(m).generate(prompts(), 10, temperature=0.0, pad_id=PAD)
    for p, toks in zip(prompts(), res.tokens):
        assert toks == naive_greedy(m, p, 10)
    assert res.finished == [False] * 4
    assert len({tuple(t) for t in res.tokens}) == 4  # rows really differ
    assert any(len(set(t)) > 2 for t in res.tokens)  # not a degenerate repeat


def test_greedy_equals_transformers_generate(tmp_path):
    m = make_gpt()
    cfg = m.cfg
    save_model(m, tmp_path, cfg, V, {"pad_id": PAD, "bos_id": 0, "eos_id": 0, "end_id": 6})
    hf = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ps = prompts()
    T = max(map(len, ps))
    idx = torch.full((len(ps), T), PAD)
    mask = torch.zeros((len(ps), T), dtype=torch.long)
    for i, p in enumerate(ps):
        idx[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        out = hf.generate(idx, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                          eos_token_id=None)
    ours = Engine(m).generate(ps, 10, temperature=0.0, pad_id=PAD)
    assert out[:, T:].tolist() == ours.tokens


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logprobs_equal_fresh_forward(temperature):
    m = make_gpt()
    g = torch.Generator().manual_seed(0)
    ps = prompts()
    res = Engine(m).generate(ps, 8, temperature=temperature, pad_id=PAD, generator=g, return_logprobs=True)
    for p, toks, lps in zip(ps, res.tokens, res.logprobs):
        assert len(toks) == len(lps) == 8
        with torch.no_grad():
            logits = m(torch.tensor([p + toks]))[0, len(p) - 1:-1]  # (8, V) predicting each new token
        ref = torch.log_softmax(logits.float() / temperature, -1).gather(1, torch.tensor(toks)[:, None]).squeeze(1)
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-5, rtol=0)


def test_sampling_reproducible_with_seeded_generator():
    m = make_gpt()
    e = Engine(m)
    a = e.generate(prompts(), 12, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = e.generate(prompts(), 12, temperature=1.0, generator=torch.Generator().manual_seed(7))
    c = e.generate(prompts(), 12, temperature=1.0, generator=torch.Generator().manual_seed(8))
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    # top_k=1 is greedy whatever the seed
    k1 = e.generate(prompts(), 6, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(3))
    assert k1.tokens == e.generate(prompts(), 6, temperature=0.0).tokens


def test_stop_ids_cut_rows_and_stream_matches():
    m = make_gpt()
    e = Engine(m)
    ps = prompts()
    free = e.generate(ps, 10, temperature=0.0).tokens
    stop = free[0][3]  # row 0 hits it at step 3 (maybe other rows too)
    res = e.generate(ps, 10, temperature=0.0, stop_ids=[stop], return_logprobs=True)
    for toks, f, fin, lps in zip(res.tokens, free, res.finished, res.logprobs):
        if stop in f:
            cut = f.index(stop) + 1
            assert toks == f[:cut] and fin
        else:
            assert toks == f and not fin
        assert len(lps) == len(toks)
    assert res.tokens[0] == free[0][:free[0].index(stop) + 1]
    # all rows stop at once -> one step
    first = [f[0] for f in free]
    res1 = e.generate(ps, 10, temperature=0.0, stop_ids=first)
    assert res1.tokens == [[t] for t in first] and all(res1.finished)
    # stream yields the same ids, the stop id included, then ends
    assert list(e.stream(ps[0], 10, temperature=0.0, stop_ids=[stop])) == res.tokens[0]
    assert list(e.stream(ps[2], 10, temperature=0.0)) == free[2]


def test_limits_and_bad_input():
    m = make_gpt()
    e = Engine(m)
    res = e.generate([[5] * 60], 20, temperature=0.0)
    assert len(res.tokens[0]) == 4  # capped at block_size=64
    with pytest.raises(ValueError, match="empty"):
        e.generate([[1, 2], []], 3)
    with pytest.raises(ValueError, match="block_size"):
        e.generate([[5] * 65], 3)
    assert e.generate([], 3).tokens == []


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.75)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.81)).tolist() == [[False, False, False, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.4)).tolist() == [[False, True, True, True]]


def test_draw_follows_the_distribution_and_never_picks_zero_probability():
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 1.0]]).repeat(50_000, 1)  # (100000, 4)
    x = draw(probs, g)
    freq_a = torch.bincount(x[0::2], minlength=4).double() / 50_000
    assert torch.allclose(freq_a, torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=torch.float64), atol=0.01)
    assert freq_a[1] == 0 and bool((x[1::2] == 3).all())
    # unnormalised rows (a filtered softmax can sum to 1 - eps) and reproducibility from the generator's seed
    p = torch.tensor([[2.0, 0.0, 2.0]])
    assert draw(p.repeat(1000, 1), torch.Generator().manual_seed(1)).tolist() == \
        draw(p.repeat(1000, 1), torch.Generator().manual_seed(1)).tolist()
    assert set(draw(p.repeat(1000, 1), g).tolist()) == {0, 2}


def test_length_groups_cut_where_padding_costs_more_than_a_forward():
    # equal lengths: one group; two clusters far apart: two groups, shortest first, row indices kept
    assert length_groups([10, 10, 10], 32) == [[0, 1, 2]]
    assert length_groups([60, 5, 58, 3], 32) == [[3, 1], [2, 0]]
    # 4 x 60 + 32 = 272 tokens in one pass vs 2 x 5 + 32 + 2 x 60 + 32 = 194 in two; with a large overhead, one
    assert length_groups([60, 5, 58, 3], 200) == [[3, 1, 2, 0]]
    assert sorted(i for g in length_groups([7, 90, 40, 41, 3, 88, 12], 32) for i in g) == list(range(7))


def test_grouped_prefill_equals_one_padded_prefill():
    m = make_gpt()
    torch.manual_seed(1)
    ps = [torch.randint(2, V, (n,)).tolist() for n in (50, 4, 47, 2, 30)]
    assert len(length_groups([len(p) for p in ps], call_overhead_tokens("cpu"))) > 1  # prefilled in groups
    idx, mask = left_padded(ps, PAD, "cpu")  # (B, P)
    P = idx.shape[1]
    with torch.no_grad():
        one = m.make_cache(len(ps), P + 4)
        ref = m(idx, attention_mask=mask, cache=one)[:, -1]  # (B, V) one padded forward
        grouped = m.make_cache(len(ps), P + 4)
        got = prefill(m, grouped, idx, mask, [len(p) for p in ps])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert grouped.length == one.length == P and grouped.padded
    assert torch.equal(grouped.valid, one.valid) and torch.equal(grouped.next_pos, one.next_pos)
    real = one.valid[None, :, None, :, None]  # padding slots hold whatever; real ones must agree
    torch.testing.assert_close(grouped.k * real, one.k * real, atol=1e-5, rtol=1e-5)
    # and generation from it: greedy equals the naive loop for every row
    res = Engine(m).generate(ps, 6, temperature=0.0, pad_id=PAD)
    for p, toks in zip(ps, res.tokens):
        assert toks == naive_greedy(m, p, 6)


def test_fused_projection_weights_follow_the_model():
    from chatforge.model.inference import inference_weights

    m = make_gpt()
    a = m.model.layers[0].self_attn
    assert m.make_cache(1, 8).fused is None  # autograd on: training keeps the modules' own weights
    with torch.no_grad():
        cache = m.make_cache(1, 8)
    fused = cache.fused
    assert torch.equal(fused.qkv[0], torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    mlp = m.model.layers[0].mlp
    assert torch.equal(fused.gate_up[0], torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    # a training step changes the weights: the next generation sees them (a new cache, new copies)
    before = Engine(m).generate(prompts(), 5, temperature=0.0).tokens
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    after = Engine(m).generate(prompts(), 5, temperature=0.0).tokens
    assert after != before
    for p, toks in zip(prompts(), after):
        assert toks == naive_greedy(m, p, 5)
    # a projection that is not a plain Linear (e.g. a LoRA wrapper) keeps the modules' path
    a.k_proj = torch.nn.Sequential(a.k_proj)
    assert inference_weights(m) is None


def test_finished_rows_leave_the_batch_without_changing_any_row(monkeypatch):
    from chatforge.model.inference import KVCache

    m = make_gpt()
    torch.manual_seed(3)
    ps = [torch.randint(2, V, (n,)).tolist() for n in (9, 4, 12, 6, 3, 8, 5, 7)]
    free = Engine(m).generate(ps, 14, temperature=1.0, generator=torch.Generator().manual_seed(0)).tokens
    stop = [f[2] for f in free[:4]]  # rows end at different steps
    kept = []
    real_keep = KVCache.keep
    monkeypatch.setattr(KVCache, "keep", lambda self, rows: (kept.append(len(rows)), real_keep(self, rows))[1])

    def run():
        return Engine(m).generate(ps, 14, temperature=1.0, stop_ids=stop, generator=torch.Generator().manual_seed(0),
                                  return_logprobs=True)
    compacted = run()
    assert kept and kept[-1] < len(ps)  # the batch shrank
    monkeypatch.delattr(KVCache, "keep")  # a cache without keep: every row stays to the end
    full = run()
    assert compacted.tokens == full.tokens and compacted.finished == full.finished
    for a, b in zip(compacted.logprobs, full.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert any(len(t) < 14 for t in full.tokens) and any(len(t) == 14 for t in full.tokens)


def test_a_prompt_given_several_times_is_prefilled_once(monkeypatch):
    from chatforge.model.inference import KVCache

    m = make_gpt()
    ps = [p for p in prompts() for _ in range(3)]  # each prompt three times, as GRPO samples a group
    batch_rows = []
    real_forward = type(m).forward


    def counting_forward(self, idx, *a, **k):
        if k["cache"].length == 0:  # a prefill call: count its rows
            batch_rows.append(idx.shape[0])
        return real_forward(self, idx, *a, **k)
    monkeypatch.setattr(type(m), "forward", counting_forward)

    def run():
        batch_rows.clear()
        return Engine(m).generate(ps, 8, temperature=1.0, generator=torch.Generator().manual_seed(0),
                                  return_logprobs=True)
    shared = run()
    assert sum(batch_rows) == len(prompts())  # the prefill saw each distinct prompt once
    monkeypatch.delattr(KVCache, "keep")  # a cache that cannot copy rows: every row prefilled
    separate = run()
    assert sum(batch_rows) == len(ps)
    assert shared.tokens == separate.tokens
    for a, b in zip(shared.logprobs, separate.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert len({tuple(t) for t in shared.tokens[:3]}) > 1  # the copies of one prompt sample apart


def test_wide_models_generate_on_prepacked_weights_with_the_same_logits():
    """From n_embd = PACK_MIN_WIDTH a CPU generation runs its products on oneDNN-prepacked weights: the logits of a
    prefill + decode through them match the modules' forward, greedy equals the naive loop, and training (autograd
    on), bf16 autocast and narrow models keep plain weights."""
    from chatforge.model.inference import PACK_MIN_WIDTH, packs_weights

    m = make_gpt(n_embd=PACK_MIN_WIDTH, n_head=4, n_kv_head=2, std=0.05)
    if not packs_weights(PACK_MIN_WIDTH, "cpu", torch.float32):
        pytest.skip("this torch build has no oneDNN prepacked linear")
    ids = torch.tensor([prompts()[2]])  # (1, 12)
    with torch.no_grad():
        cache = m.make_cache(1, 16)
        f = cache.fused
        assert all(w.is_mkldnn for w in f.qkv + f.o + f.gate_up + f.down + [f.head])
        pre = m(ids[:, :-1], cache=cache)  # (1, 11, V)
        step = m(ids[:, -1:], cache=cache)  # (1, 1, V)
        full = m(ids)  # the modules' forward, no cache
    torch.testing.assert_close(torch.cat([pre, step], 1), full, atol=1e-4, rtol=1e-4)
    res = Engine(m).generate(prompts(), 8, temperature=0.0, pad_id=PAD)
    for p, toks in zip(prompts(), res.tokens):
        assert toks == naive_greedy(m, p, 8)
    assert not packs_weights(PACK_MIN_WIDTH - 1, "cpu", torch.float32)
    assert not packs_weights(PACK_MIN_WIDTH, "cpu", torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not packs_weights(PACK_MIN_WIDTH, "cpu", torch.float32)
    assert m.make_cache(1, 8).fused is None  # autograd on


@pytest.mark.parametrize("width,autocast,scripted", [(64, False, True), (256, False, True), (64, False, False),
                                                     (64, True, False)])
def test_flat_decode_step_equals_the_modules_forward_bit_for_bit(width, autocast, scripted, monkeypatch):
    """A decode step on arranged weights runs flat (model.inference.decode_step: no module calls, rotary angles
    from a table, the blocks run by TorchScript); its logits and the cache it leaves equal the modules' forward on
    the same cache exactly, on left-padded prompts with grouped-query heads, prepacked (wide) or plain weights,
    scripted or in Python, and under bf16 autocast (Python)."""
    from chatforge.engine import left_padded
    from chatforge.model import inference
    from chatforge.model.inference import linear

    calls = []
    real_step = inference.decode_step

    def step(w, ids, cache, scripted=True):
        calls.append(inference.scripted_decode_blocks() is not None and scripted and not autocast)
        return real_step(w, ids, cache, scripted=scripted)
    monkeypatch.setattr("chatforge.model.gpt.decode_step", lambda w, ids, cache: step(w, ids, cache, scripted))

    m = make_gpt(n_embd=width, n_head=4, n_kv_head=2, std=0.05)
    idx, mask = left_padded(prompts(), PAD, "cpu")  # (4, 12)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        dtype = torch.bfloat16 if autocast else torch.float32
        flat, modules = m.make_cache(4, 20, dtype=dtype), m.make_cache(4, 20, dtype=dtype)
        assert flat.fused is not None
        nxt = m(idx, attention_mask=mask, cache=flat, last_only=True)[:, -1].argmax(-1)  # (4,)
        m(idx, attention_mask=mask, cache=modules, last_only=True)
        for _ in range(5):
            a = m(nxt[:, None], cache=flat, last_only=True)[:, -1]  # (4, V): the flat step
            b = linear(m.model(nxt[:, None], cache=modules)[:, -1:], modules.fused.head)[:, -1]  # the modules
            assert torch.equal(a, b)
            nxt = a.argmax(-1)
    assert calls == [scripted and not autocast] * 5  # every decode step took the flat path, scripted as asked
    for name in ("k", "v", "valid", "next_pos"):
        assert torch.equal(getattr(flat, name), getattr(modules, name)), name
    assert flat.length == modules.length == 17


def test_prepacked_weights_are_kept_between_generations_until_the_weights_change():
    """A wide model's prepacked weights are arranged once and kept while its parameters stay as they are; an
    in-place edit, load_state_dict, a training forward and an optimizer step (fused AdamW, which does not bump
    version counters itself: chatforge.optim bumps them) each make the next generation arrange them again, so a
    generation always sees the weights of now (greedy equals the naive loop after each change)."""
    from chatforge.config import OptimConfig
    from chatforge.model.inference import PACK_MIN_WIDTH, _KEPT, packs_weights
    from chatforge.optim import make_optimizer

    if not packs_weights(PACK_MIN_WIDTH, "cpu", torch.float32):
        pytest.skip("this torch build has no oneDNN prepacked linear")
    m = make_gpt(n_embd=PACK_MIN_WIDTH, n_head=4, n_kv_head=2, std=0.05)
    narrow = make_gpt()
    p = prompts()[2]

    def arranged():
        with torch.no_grad():
            return m.make_cache(1, 8).fused

    def greedy_matches():
        return Engine(m).generate([p], 6, temperature=0.0).tokens[0] == naive_greedy(m, p, 6)

    first = arranged()
    assert arranged() is first and greedy_matches()  # kept, and generation uses it
    with torch.no_grad():
        narrow.make_cache(1, 8)
    assert narrow.model not in _KEPT  # plain weights (a concatenation) are made per generation
    with torch.no_grad():
        m.model.layers[0].mlp.down_proj.weight.mul_(1.5)  # an in-place edit
    second = arranged()
    assert second is not first and greedy_matches()
    m.load_state_dict(make_gpt(seed=3, n_embd=PACK_MIN_WIDTH, n_head=4, n_kv_head=2, std=0.05).state_dict())
    third = arranged()
    assert third is not second and greedy_matches()
    opt = make_optimizer(m, 1e-2, OptimConfig(), torch.device("cpu"))
    assert opt.defaults["fused"]
    m(torch.tensor([p])).logsumexp(-1).mean().backward()  # a training forward drops the kept copy
    assert m.model not in _KEPT
    arranged()
    opt.step()  # fused AdamW writes the weights in place, no forward between (as under torch.compile)
    fourth = arranged()
    assert fourth is not third and greedy_matches()
    with torch.inference_mode():  # parameters made here have no version counter: nothing is kept
        frozen = make_gpt(n_embd=PACK_MIN_WIDTH, n_head=4, n_kv_head=2, std=0.05)
    assert Engine(frozen).generate([p], 6, temperature=0.0).tokens[0] == naive_greedy(frozen, p, 6)
    assert frozen.model not in _KEPT


def test_attention_segments_skip_left_padding_where_a_call_pays():
    """Rows whose real tokens start at slots ``first`` split into runs that attend from their earliest slot: a run
    pays for itself when the padding slots it skips exceed one more call's cost."""
    from chatforge.model.inference import attention_segments

    assert attention_segments([0, 0, 0]) == ([0, 3], [0])
    assert attention_segments([0, 50, 50, 50], call_cost=96) == ([0, 1, 4], [0, 50])  # skips 150 > 96
    assert attention_segments([0, 50, 50, 50], call_cost=200) == ([0, 4], [0])  # 150 < 200: one call
    assert attention_segments([0, 30, 40, 90, 90], call_cost=50) == ([0, 1, 3, 5], [0, 30, 90])
    assert attention_segments([7]) == ([0, 1], [7])


def test_decode_by_segments_equals_attending_to_every_slot(monkeypatch):
    """The engine orders rows longest prompt first and attends by runs of rows (KVCache.segments): tokens and
    log-probs equal those of one attention call over every slot, on prompts of very different lengths, with rows
    leaving the batch as they stop."""
    from chatforge.model.inference import KVCache

    m = make_gpt()
    torch.manual_seed(2)
    ps = [torch.randint(2, V, (n,)).tolist() for n in (3, 40, 5, 38, 2, 20)]
    kw = dict(temperature=1.0, stop_ids=list(range(2, V, 9)), pad_id=PAD, return_logprobs=True)
    segmented = Engine(m).generate(ps, 12, generator=torch.Generator().manual_seed(1), **kw)
    calls = []
    real = KVCache.segments

    def one_call(self):
        calls.append(real(self))
        return [0, self.k.shape[1]], [0]
    monkeypatch.setattr(KVCache, "segments", one_call)
    whole = Engine(m).generate(ps, 12, generator=torch.Generator().manual_seed(1), **kw)
    assert any(len(starts) > 1 for _, starts in calls)  # the batch did split
    assert segmented.tokens == whole.tokens and segmented.finished == whole.finished
    for a, b in zip(segmented.logprobs, whole.logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    assert any(not f for f in whole.finished) and any(whole.finished)  # some rows stopped, some ran on


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it there)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_decode_step_on_cuda_equals_the_modules(dtype):
    """On a GPU the decode step runs the same flat, scripted blocks (no prepacking there): its logits match the
    modules' forward on the same cache, and greedy generation equals the naive loop, in fp32 and in bf16 weights."""
    from chatforge.engine import left_padded
    from chatforge.model.inference import linear

    m = make_gpt(n_embd=64, n_head=4, n_kv_head=2, std=0.05).to("cuda", dtype)
    idx, mask = left_padded(prompts(), PAD, "cuda")
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    with torch.no_grad():
        flat, modules = m.make_cache(4, 20, "cuda", dtype), m.make_cache(4, 20, "cuda", dtype)
        nxt = m(idx, attention_mask=mask, cache=flat, last_only=True)[:, -1].argmax(-1)
        m(idx, attention_mask=mask, cache=modules, last_only=True)
        for _ in range(5):
            a = m(nxt[:, None], cache=flat, last_only=True)[:, -1]
            b = linear(m.model(nxt[:, None], cache=modules)[:, -1:], modules.fused.head)[:, -1]
            torch.testing.assert_close(a.float(), b.float(), **tol)
            nxt = b.argmax(-1)
    if dtype == torch.float32:
        res = Engine(m).generate(prompts(), 8, temperature=0.0, pad_id=PAD)
        for p, toks in zip(prompts(), res.tokens):
            assert toks == naive_greedy(m, p, 8)
