"""DPO through the stage: log 2 at the start, precomputed reference == on the fly, learning, drift, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from chatforge.config import ConfigError, load_config
from chatforge.data.batching import BucketBatcher
from chatforge.stages import dpo
from tests.test_rm import MICRO, build_micro_base, rows, write_demo_pairs
from tests.conftest import interrupted_then_resumed


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory) -> Path:
    return build_micro_base(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_demo_pairs(tmp_path_factory.mktemp("dpo_pairs") / "pairs.jsonl", 300, seed=1)


def dpo_cfg(base: Path, pairs: Path, *extra: str):
    return load_config("dpo", MICRO, [f"model.init={base}", f"data.path=[{pairs}]", "data.val_fraction=0.2",
                                      "train.eval_batches=0", "train.ckpt_every=0", "optim.lr=1e-3",
                                      "optim.warmup_steps=2", *extra])


def test_loss_is_log2_at_the_start_and_precompute_matches(micro_base, pairs_file, tmp_path):
    args = ("train.max_steps=3", "train.eval_every=0", "data.max_examples=48")
    live = dpo.run(dpo_cfg(micro_base, pairs_file, *args), tmp_path / "live")
    first = rows(tmp_path / "live", "train")[0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference: h = 0
    assert first["reward_chosen"] == pytest.approx(0, abs=1e-6) and first["accuracy"] == 0.0  # every pair ties
    assert first["chosen_drift"] == pytest.approx(0, abs=1e-6)
    pre = dpo.run(dpo_cfg(micro_base, pairs_file, *args, "dpo.precompute_ref=true"), tmp_path / "pre")
    a, b = rows(tmp_path / "live", "train"), rows(tmp_path / "pre", "train")
    for ra, rb in zip(a, b):  # later steps compare against the stored reference log-probs too
        for k in ("loss", "reward_chosen", "reward_rejected", "chosen_drift"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), (k, ra, rb)
    assert live["eval_val_loss"] == pytest.approx(pre["eval_val_loss"], abs=1e-5)
    cfg = json.loads((tmp_path / "pre" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    # LoRA: the reference is the policy with its adapters off, read through the same one-row-per-pair path
    dpo.run(dpo_cfg(micro_base, pairs_file, "train.max_steps=1", "train.eval_every=0", "data.max_examples=48",
                    "lora.r=4"), tmp_path / "lora")
    first = rows(tmp_path / "lora", "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7) and first["accuracy"] == 0.0
    assert first["reward_chosen"] == 0.0 and first["chosen_drift"] == 0.0  # exact ties


def test_ipo_starts_at_its_known_value(micro_base, pairs_file, tmp_path):
    dpo.run(dpo_cfg(micro_base, pairs_file, "train.max_steps=1", "train.eval_every=0", "data.max_examples=16",
                    "dpo.loss=ipo", "dpo.beta=0.5"), tmp_path / "ipo")
    assert rows(tmp_path / "ipo", "train")[0]["loss"] == pytest.approx((1 / (2 * 0.5)) ** 2, abs=1e-6)


def test_dpo_raises_held_out_preference_accuracy(micro_base, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    dpo.run(dpo_cfg(micro_base, pairs_file, "train.max_steps=30", "train.eval_every=15"), out)
    evals = rows(out, "eval")
    assert [r["step"] for r in evals] == [0, 15, 30]
    start, end = evals[0], evals[-1]
    assert start["val_accuracy"] == 0.0 and start["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert end["val_pairs"] == 60
    assert end["val_accuracy"] > 0.5, end  # measured ~0.6-0.7 after 30 steps
    assert end["val_margin"] > 0 and end["val_loss"] < math.log(2)
    assert end["val_chosen_drift"] != 0.0 and math.isfinite(end["val_chosen_drift"])
    info = json.loads((out / "chatforge.json").read_text())
    assert info["stage"] == "dpo" and "eval_val_chosen_drift" in info["metrics"]
    from chatforge.model.load import load_causal_lm

    model, _, tok = load_causal_lm(out)  # a causal model directory that the next stage can start from
    ids = torch.tensor([[tok.bos_id, tok.user_id, 300, tok.end_id, tok.assistant_id]])
    assert model(ids).shape == (1, 5, tok.vocab_size)


def test_exact_resume(micro_base, pairs_file, tmp_path, monkeypatch):
    args = ("train.max_steps=6", "train.eval_every=3", "data.max_examples=48", "train.eval_batches=1")
    full = tmp_path / "full"
    dpo.run(dpo_cfg(micro_base, pairs_file, *args), full)
    out = tmp_path / "cut"  # stopped inside step 4 (checkpoint after it), then resumed
    interrupted_then_resumed(monkeypatch, BucketBatcher, "next", 4,
                             lambda: dpo.run(dpo_cfg(micro_base, pairs_file, *args), out))
    keys = ("step", "loss", "reward_chosen", "reward_rejected", "accuracy", "chosen_drift")
    assert [[r[k] for k in keys] for r in rows(out, "train")] == [[r[k] for k in keys] for r in rows(full, "train")]
    assert [r["val_loss"] for r in rows(out, "eval")] == [r["val_loss"] for r in rows(full, "eval")]


def test_dpo_config_errors(micro_base, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="model.init"):
        dpo.run(load_config("dpo", MICRO, [f"data.path=[{pairs_file}]"]), tmp_path / "a")
    with pytest.raises(ConfigError, match="beta"):
        dpo.run(dpo_cfg(micro_base, pairs_file, "dpo.beta=0"), tmp_path / "b")


def test_step0_is_log2_with_bf16_autocast_and_precomputed_reference(micro_base, pairs_file, tmp_path):
    """The precomputed reference log-probs run under the policy's autocast (bf16 here, which the CPU has too): at
    step 0 policy == reference, so every pair ties and the loss is log 2, exactly as without autocast."""
    args = ("train.max_steps=1", "train.eval_every=1", "data.max_examples=48", "train.dtype=bf16")
    dpo.run(dpo_cfg(micro_base, pairs_file, *args, "dpo.precompute_ref=true"), tmp_path / "pre")
    first, ev = rows(tmp_path / "pre", "train")[0], rows(tmp_path / "pre", "eval")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_chosen"] == 0.0 and first["reward_rejected"] == 0.0 and first["chosen_drift"] == 0.0
    assert first["accuracy"] == 0.0  # every pair ties
    # the held-out pairs after one step compare the bf16 policy with a bf16 reference: same as computed live
    dpo.run(dpo_cfg(micro_base, pairs_file, *args), tmp_path / "live")
    live = rows(tmp_path / "live", "eval")[0]
    assert ev["val_loss"] == pytest.approx(live["val_loss"], abs=1e-6)


def test_dropout_of_the_starting_model_is_off(micro_base, pairs_file, tmp_path):
    """A starting model saved with dropout: policy and reference are compared forward to forward, so dropout is
    off in both (as TRL) and the step-0 loss is still exactly log 2; the saved model records no dropout."""
    import shutil

    base = tmp_path / "base_dropout"
    shutil.copytree(micro_base, base)
    conf = json.loads((base / "config.json").read_text())
    conf["attention_dropout"] = 0.3
    (base / "config.json").write_text(json.dumps(conf))
    dpo.run(dpo_cfg(base, pairs_file, "train.max_steps=1", "train.eval_every=0", "data.max_examples=32"),
            tmp_path / "dpo")
    first = rows(tmp_path / "dpo", "train")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["chosen_drift"] == pytest.approx(0, abs=1e-7)
    assert json.loads((tmp_path / "dpo" / "config.json").read_text())["attention_dropout"] == 0.0


def test_ipo_implicit_rewards_are_the_per_token_averages_of_its_loss(micro_base):
    """IPO's loss uses per-token averaged log-probs; its logged implicit rewards (margin, accuracy) come from the
    same averages: beta * (sum log pi / n - sum log ref / n), per response."""
    from chatforge.data.pairs import TokenPair, collate_pairs
    from chatforge.model.load import load_causal_lm

    model, _, tok = load_causal_lm(micro_base, "cpu")
    model.eval()
    pairs = [TokenPair([5, 6, 7], [8, 9, tok.end_id], [10, 11, 12, 13, 14, tok.end_id], "t:1"),
             TokenPair([5, 9], [20, 21, 22, 23, tok.end_id], [24, tok.end_id], "t:2")]
    with torch.no_grad():
        pi, n = dpo.pair_logps(model, pairs, tok.pad_id, "cpu", packed=True)  # (4,), (4,)
        assert n.tolist() == [3.0, 5.0, 6.0, 2.0]
        torch.testing.assert_close(pi, dpo.response_logps(model, collate_pairs(pairs, tok.pad_id))[0])
        rf = pi - torch.tensor([0.3, -0.6, 1.2, 0.4])  # a reference that differs per response
        beta = 0.5
        l, rc, rr, *_ = dpo.pair_terms(model, pairs, tok.pad_id, "cpu", True, rf, beta, "ipo")
    avg_c, avg_r = (pi[:2] - rf[:2]) / n[:2], (pi[2:] - rf[2:]) / n[2:]
    torch.testing.assert_close(rc, beta * avg_c)  # [0.5 * 0.1, 0.5 * -0.12]
    torch.testing.assert_close(rr, beta * avg_r)  # [0.5 * 0.2, 0.5 * 0.2]
    torch.testing.assert_close(rc, torch.tensor([0.05, -0.06]))
    torch.testing.assert_close(l, (avg_c - avg_r - 1 / (2 * beta)) ** 2)


def test_response_logps_in_length_groups_equal_one_padded_forward(monkeypatch):
    """The grouped, head-on-the-span scoring gives the sums and counts of one forward over the whole padded batch
    (the log-probs of every response token, read from the full logits), and its head sees only response spans."""
    from chatforge.config import ModelConfig
    from chatforge.data.pairs import TokenPair, collate_pairs
    from chatforge.losses import token_logprobs
    from chatforge.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=128), 50).eval()
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    pairs = [TokenPair(ids(p), ids(c), ids(r), "x:1") for p, c, r in [(3, 2, 5), (40, 30, 4), (6, 70, 2), (50, 1, 1)]]
    batch = collate_pairs(pairs, 0)
    monkeypatch.setattr(dpo, "call_overhead_tokens", lambda device, **kw: 8.0)  # cheap calls: several groups
    seen = []
    hook = model.lm_head.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    with torch.no_grad():
        sums, counts = dpo.response_logps(model, batch)
        hook.remove()
        lp = token_logprobs(model(batch.ids)[:, :-1], batch.ids[:, 1:])  # (2B, T-1), one padded forward
    m = batch.response_mask[:, 1:].float()
    torch.testing.assert_close(sums, (lp * m).sum(1), atol=1e-4, rtol=0)
    assert counts.tolist() == m.sum(1).tolist() == [2, 30, 70, 1, 5, 4, 2, 1]
    assert len(seen) > 1 and sum(seen) < batch.ids.shape[1] * len(seen) // 2  # groups, each head on its spans


def test_packed_pairs_give_the_log_probs_and_gradients_of_separate_sequences(monkeypatch):
    """One row per pair (the prompt once, both answers branching from it) gives each answer the log-probs of its own
    sequence prompt + answer, and the same gradient, in several length groups; a row that would reach past the
    context raises."""
    from chatforge.config import ModelConfig
    from chatforge.data.pairs import TokenPair, collate_packed
    from chatforge.losses import token_logprobs
    from chatforge.model.gpt import GPT, branch_layout

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64), 50)
    g = torch.Generator().manual_seed(2)
    ids = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    pairs = [TokenPair(ids(p), ids(c), ids(r), "x:1") for p, c, r in [(3, 2, 5), (20, 30, 4), (6, 50, 2), (1, 1, 1)]]
    packed = collate_packed(pairs, 0)
    pos, _ = branch_layout(packed.branches)
    assert pos[1, :54].tolist() == list(range(50)) + list(range(20, 24))  # rejected restarts after the prompt
    monkeypatch.setattr(dpo, "call_overhead_tokens", lambda device, **kw: 8.0)  # several groups

    def separate():  # each answer as its own sequence, one forward each
        out = []
        for side in ("chosen", "rejected"):
            for p in pairs:
                seq = torch.tensor([p.prompt + getattr(p, side)])
                lp = token_logprobs(model(seq)[:, :-1], seq[:, 1:])[0, len(p.prompt) - 1:]
                out.append(lp.sum())
        return torch.stack(out)  # (2B,)

    sums, counts = dpo.packed_logps(model, packed)
    ref = separate()
    torch.testing.assert_close(sums, ref, atol=1e-4, rtol=1e-5)
    assert counts.tolist() == [2, 30, 50, 1, 5, 4, 2, 1]
    w = torch.randn(8, generator=g)
    (sums * w).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (ref * w).sum().backward()
    for a, b in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    long = [TokenPair(ids(40), ids(30), ids(30), "x:2")]  # positions reach 69 >= block_size 64
    with pytest.raises(ValueError, match="beyond the context length"):
        dpo.packed_logps(model, collate_packed(long, 0))


def test_a_sharded_model_gets_one_forward_per_batch_whatever_the_lengths(monkeypatch):
    """FSDP: every rank must make the same number of forward calls (each gathers shards with the others), so the
    two-sequence path does not split a batch into length groups for a sharded model."""
    from chatforge import distributed as D
    from chatforge.config import ModelConfig
    from chatforge.data.pairs import TokenPair, collate_pairs
    from chatforge.model.gpt import GPT

    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=128), 50).eval()
    pairs = [TokenPair([1] * p, [2] * c, [3] * r, "x:1") for p, c, r in [(2, 1, 1), (60, 30, 40), (5, 2, 3)]]
    calls = []
    model.model.register_forward_hook(lambda m, i, o: calls.append(1))  # the trunk: one call per forward
    with torch.no_grad():
        dpo.response_logps(model, collate_pairs(pairs, 0))
        assert len(calls) > 1  # not sharded: length groups
        calls.clear()
        monkeypatch.setattr(D, "is_fsdp", lambda m: True)
        dpo.response_logps(model, collate_pairs(pairs, 0))
    assert len(calls) == 1
