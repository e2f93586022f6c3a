"""The native Llama model: masking, padding, positions, KV cache, GQA, scalar head."""

import pytest
import torch

from chatforge.config import ModelConfig
from chatforge.model.gpt import GPT, mlp_hidden_size
from chatforge.model.heads import ScalarModel, gather_last, last_token_index

V = 300


def tiny(**kw) -> ModelConfig:
    base = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=64)
    base.update(kw)
    return ModelConfig(**base)


def make_gpt(seed=0, std=0.1, **kw) -> GPT:
    """A tiny model with a larger init so that logits differ clearly between tokens."""
    torch.manual_seed(seed)
    m = GPT(tiny(**kw), V)
    m.init_weights(std)
    return m.eval()


def left_pad(rows, pad=0):
    """Left-pad lists of ids -> (idx (B, T), mask (B, T))."""
    T = max(len(r) for r in rows)
    idx = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return idx, mask


def test_shapes_and_state_dict_names():
    m = make_gpt(tie_embeddings=False)
    x = torch.randint(0, V, (3, 7))
    assert m(x).shape == (3, 7, V)
    assert m.model(x).shape == (3, 7, 64)
    keys = set(m.state_dict())
    for k in ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
              "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight",
              "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"]:
        assert k in keys
    assert not any("bias" in k or "inv_freq" in k for k in keys)
    assert m.state_dict()["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 64)  # GQA: 2 kv heads


def test_intermediate_size_rule_and_param_count():
    assert mlp_hidden_size(ModelConfig(n_embd=64)) == 192  # int(170.67) -> 170 -> 192
    assert mlp_hidden_size(ModelConfig(n_embd=768)) == 2048
    assert mlp_hidden_size(ModelConfig(n_embd=64, intermediate_size=100)) == 100
    m_tied, m_untied = make_gpt(), make_gpt(tie_embeddings=False)
    d, h, L, kv = 64, 192, 2, 32
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
    assert m_tied.num_params() == V * d + L * per_layer + d
    assert m_untied.num_params() == 2 * V * d + L * per_layer + d
    # the head is a matmul (kept), the input table is a lookup (dropped), tied or not
    assert m_tied.num_params(exclude_embeddings=True) == m_untied.num_params(exclude_embeddings=True)
    assert m_tied.flops_per_token() == 6 * m_tied.num_params(True) + 12 * L * d * 64


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    m = GPT(tiny(n_layer=8, n_embd=256, n_head=4), V)
    q = m.model.layers[0].self_attn.q_proj.weight.std().item()
    o = m.model.layers[0].self_attn.o_proj.weight.std().item()
    assert abs(q - 0.02) < 1e-3
    assert abs(o - 0.02 / 4) < 5e-4  # 0.02 / sqrt(2 * 8)
    assert torch.equal(m.model.norm.weight, torch.ones(256))


def test_causal_future_tokens_do_not_change_earlier_logits():
    m = make_gpt()
    x = torch.randint(0, V, (2, 12))
    y = x.clone()
    y[:, 8:] = (y[:, 8:] + 7) % V
    lx, ly = m(x), m(y)
    torch.testing.assert_close(lx[:, :8], ly[:, :8], atol=1e-6, rtol=0)
    assert (lx[:, 8:] - ly[:, 8:]).abs().max() > 1e-3


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
def test_left_and_right_padding_match_unpadded(n_kv_head):
    m = make_gpt(n_kv_head=n_kv_head)
    rows = [list(range(5, 17)), [40, 41, 42, 43, 44], [7, 8, 9]]
    idx, mask = left_pad(rows)
    out = m(idx, attention_mask=mask)  # (B, T, V)
    T = idx.shape[1]
    for i, r in enumerate(rows):
        ref = m(torch.tensor([r]))[0]  # (t, V)
        torch.testing.assert_close(out[i, T - len(r):], ref, atol=1e-5, rtol=0)
    # right padding: outputs at real positions match too
    ridx = torch.zeros_like(idx)
    rmask = torch.zeros_like(mask)
    for i, r in enumerate(rows):
        ridx[i, :len(r)] = torch.tensor(r)
        rmask[i, :len(r)] = 1
    rout = m(ridx, attention_mask=rmask)
    for i, r in enumerate(rows):
        torch.testing.assert_close(rout[i, :len(r)], m(torch.tensor([r]))[0], atol=1e-5, rtol=0)


def test_all_ones_mask_equals_fast_path():
    m = make_gpt()
    x = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(m(x, attention_mask=torch.ones_like(x)), m(x), atol=1e-6, rtol=0)


def test_kv_cache_decode_equals_full_forward_left_padded():
    m = make_gpt()
    torch.manual_seed(1)
    rows = [torch.randint(0, V, (n,)).tolist() for n in (9, 4, 6)]
    n_new = 7
    full_rows = [r + torch.randint(0, V, (n_new,)).tolist() for r in rows]
    # prompt = the first len(r) tokens of each row, left-padded; then decode the rest one by one
    idx, mask = left_pad(rows)
    P = idx.shape[1]
    cache = m.make_cache(3, P + n_new, dtype=torch.float32)
    steps = [m(idx, attention_mask=mask, cache=cache)[:, -1]]  # (B, V)
    for t in range(n_new - 1):
        tok = torch.tensor([[fr[len(r) + t]] for fr, r in zip(full_rows, rows)])  # (B, 1)
        steps.append(m(tok, cache=cache)[:, -1])
    assert cache.length == P + n_new - 1
    assert cache.next_pos.tolist() == [len(r) + n_new - 1 for r in rows]
    for i, (r, fr) in enumerate(zip(rows, full_rows)):
        ref = m(torch.tensor([fr]))[0]  # (len(fr), V)
        for t in range(n_new):
            torch.testing.assert_close(steps[t][i], ref[len(r) - 1 + t], atol=1e-5, rtol=0)
    # prefill logits at real prompt tokens also equal the full forward
    cache2 = m.make_cache(3, P)
    pre = m(idx, attention_mask=mask, cache=cache2)
    torch.testing.assert_close(pre[mask.bool()], m(idx, attention_mask=mask)[mask.bool()], atol=1e-6, rtol=0)


def test_kv_cache_chunked_prefill_and_overflow():
    m = make_gpt()
    x = torch.randint(0, V, (2, 12))
    cache = m.make_cache(2, 12)
    a = m(x[:, :5], cache=cache)
    b = m(x[:, 5:], cache=cache)  # a multi-token chunk after a cached prefix
    torch.testing.assert_close(torch.cat([a, b], 1), m(x), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="KV cache full"):
        m(x[:, :1], cache=cache)


def test_gqa_equals_mha_with_repeated_kv_weights():
    g = make_gpt(n_kv_head=2)
    torch.manual_seed(0)
    mha = GPT(tiny(n_kv_head=None), V).eval()
    sd = g.state_dict()
    hd = 16
    for k, w in list(sd.items()):
        if k.endswith(("k_proj.weight", "v_proj.weight")):  # (Hkv*hd, d) -> (H*hd, d), each kv head twice
            sd[k] = w.view(2, hd, 64).repeat_interleave(2, dim=0).reshape(4 * hd, 64)
    mha.load_state_dict(sd)
    x = torch.randint(0, V, (2, 10))
    torch.testing.assert_close(mha(x), g(x), atol=1e-5, rtol=0)


def test_block_size_enforced_and_dropout_only_in_training():
    m = make_gpt(dropout=0.5)
    with pytest.raises(ValueError, match="block_size"):
        m(torch.zeros(1, 65, dtype=torch.long))
    x = torch.randint(0, V, (1, 8))
    torch.testing.assert_close(m(x), m(x))  # eval: deterministic
    m.train()
    assert (m(x) - m(x)).abs().max() > 1e-3


def test_scalar_model_gather_last_left_and_right_padding():
    torch.manual_seed(0)
    gpt = make_gpt()
    rm = ScalarModel.from_trunk(gpt)
    # trunk copied: hidden states equal
    x = torch.randint(0, V, (2, 9))
    torch.testing.assert_close(rm.model(x), gpt.model(x))
    rows = [[5, 6, 7, 8, 9], [10, 11]]
    lidx, lmask = left_pad(rows)
    ridx, rmask = torch.zeros_like(lidx), torch.zeros_like(lmask)
    for i, r in enumerate(rows):
        ridx[i, :len(r)], rmask[i, :len(r)] = torch.tensor(r), 1
    assert last_token_index(lmask).tolist() == [4, 4]
    assert last_token_index(rmask).tolist() == [4, 1]
    left = gather_last(rm(lidx, lmask), lmask)
    right = gather_last(rm(ridx, rmask), rmask)
    ref = torch.stack([rm(torch.tensor([r]))[0, -1] for r in rows])
    assert left.dtype == torch.float32 and left.shape == (2,)
    torch.testing.assert_close(left, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(right, ref, atol=1e-5, rtol=0)
    assert ref.abs().min() > 0  # reward head is not zero-initialised
    rm.init_score(0.0)  # critic
    assert rm(x).abs().max() == 0
    rm.init_score()
    assert abs(rm.score.weight.std().item() - 1 / 65 ** 0.5) < 0.05


def test_rope_constants_made_during_generation_are_normal_tensors():
    """The rotary constants are cached at first use, which in RL is the rollout's generation (inference mode); they
    must still be normal tensors: a compiled training forward saves them for its backward, and inference tensors
    cannot be saved ("Inference tensors cannot be saved for backward")."""
    from chatforge.model import ops

    with torch.inference_mode():
        inv_freq, sign = ops.rope_constants(16, 4321.0, "cpu")  # a (head_dim, theta) no other test uses
    assert not inv_freq.is_inference() and not sign.is_inference()
    assert torch.equal(inv_freq, 1.0 / 4321.0 ** (torch.arange(0, 16, 2).float() / 16))
    assert sign.tolist() == [-1.0] * 8 + [1.0] * 8


@pytest.mark.slow
def test_compiled_model_trains_after_generating():
    """train.compile: a compiled model first run under inference mode (an RL rollout) then trained gives the eager
    model's loss and gradients (a rotary theta no other test uses, so its constants are made by the first call)."""
    import copy

    eager = make_gpt(seed=3, rope_theta=7777.0).train()
    compiled = torch.compile(copy.deepcopy(eager))
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        compiled(ids)
    losses = []
    for m in (compiled, eager):
        loss = m(ids).logsumexp(-1).mean()
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6), name
