"""RL micro-batch invariance: a PPO or GRPO/RLOO update split into micro-batches (``train.batch_size`` rows each)
gives the same gradient as the same minibatch in one piece.

Each optimizer step's gradients are captured just before the step (``Trainer.optimizer_step``) and compared
between a run whose minibatches are one micro-batch each and a run that splits them into micro-batches of one
row. Responses of different lengths (the micro SFT policy ends its turns) make a per-micro-batch instead of
per-minibatch normalisation show up as a different gradient. (Minibatches are not compared with one batch:
each minibatch is its own optimizer step, so the updates differ by design; the global-denominator contract
across ranks is tested in tests/test_distributed.py.)
"""

from __future__ import annotations

import pytest
import torch

from chatforge.config import load_config
from chatforge.trainer import Trainer
from tests.rl_fixtures import (  # noqa: F401  (world, single_thread: fixtures)
    MICRO, rl_overrides, single_thread, train_rows, world,
)


def captured_grads(monkeypatch, run) -> list[dict[str, torch.Tensor]]:
    """Run ``run()`` and return, per optimizer step, {role/parameter name: gradient} (before clipping)."""
    real = Trainer.optimizer_step
    grads: list[dict[str, torch.Tensor]] = []

    def optimizer_step(self, *args, **kwargs):
        grads.append({f"{role}/{n}": p.grad.detach().clone() for role, m in self.models.items()
                      for n, p in m.named_parameters() if p.grad is not None})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "optimizer_step", optimizer_step)
    run()
    monkeypatch.setattr(Trainer, "optimizer_step", real)
    return grads


def assert_same_grads(one: list[dict], split: list[dict]) -> None:
    assert len(one) == len(split) and one, (len(one), len(split))
    for i, (a, b) in enumerate(zip(one, split)):
        assert a.keys() == b.keys()
        for k in a:
            scale = float(a[k].abs().max()) + 1e-12
            err = float((a[k] - b[k]).abs().max())
            assert err <= 1e-4 * scale + 1e-7, f"optimizer step {i}, {k}: max |diff| {err:.3g} vs max |grad| {scale:.3g}"


def run_twice(monkeypatch, tmp_path, stage_run, make_cfg) -> tuple[list, list, list]:
    one = captured_grads(monkeypatch, lambda: stage_run(make_cfg("train.batch_size=64"), tmp_path / "one"))
    split = captured_grads(monkeypatch, lambda: stage_run(make_cfg("train.batch_size=1"), tmp_path / "split"))
    rows = train_rows(tmp_path / "one")
    assert any(0.0 < r["eos_fraction"] < 1.0 for r in rows), "the responses must differ in length for this test"
    return one, split, rows


def assert_same_logged_means(tmp_path) -> None:
    """The logged minibatch means (losses, approx. KL) do not depend on the micro-batching either."""
    one, split = train_rows(tmp_path / "one"), train_rows(tmp_path / "split")
    for key in ("loss", "policy_loss", "approx_kl"):
        assert [r[key] for r in one] == pytest.approx([r[key] for r in split], rel=1e-4, abs=1e-6), key


def test_ppo_update_is_micro_batch_invariant(monkeypatch, tmp_path, world):
    from chatforge.stages import ppo

    def make_cfg(mb: str):
        return load_config("ppo", MICRO, rl_overrides(world, 2, "rl.prompts_per_step=6", "rl.minibatches=2",
                                                      "rl.ppo_epochs=2", "rl.kl_coef=0.2",
                                                      "rl.missing_eos_penalty=null", "train.device=cpu", mb))

    one, split, _ = run_twice(monkeypatch, tmp_path, ppo.run, make_cfg)
    assert len(one) == 2 * 2 * 2  # 2 steps x 2 epochs x 2 minibatches
    assert any(k.startswith("critic/") for k in one[0]) and any(k.startswith("actor/") for k in one[0])
    assert_same_grads(one, split)
    assert_same_logged_means(tmp_path)


@pytest.mark.parametrize("algo,averaging", [("grpo", "token"), ("grpo", "sequence"), ("rloo", "token")])
def test_grpo_update_is_micro_batch_invariant(monkeypatch, tmp_path, world, algo, averaging):
    from chatforge.stages import grpo

    def make_cfg(mb: str):
        return load_config("grpo", MICRO, rl_overrides(world, 2, f"rl.algo={algo}", "rl.prompts_per_step=3",
                                                       "rl.group_size=3", "rl.minibatches=2", "rl.ppo_epochs=2",
                                                       "rl.grpo_kl_coef=0.1", f"rl.loss_averaging={averaging}",
                                                       "rl.missing_eos_penalty=null", "train.device=cpu", mb))

    one, split, _ = run_twice(monkeypatch, tmp_path, grpo.run, make_cfg)
    assert len(one) == 2 * 2 * 2
    assert_same_grads(one, split)
    assert_same_logged_means(tmp_path)


@pytest.mark.parametrize("algo,epochs", [("grpo", 1), ("rloo", 1), ("grpo", 2)])
def test_grpo_old_logprobs_from_the_update_equal_a_rollout_pass(monkeypatch, tmp_path, world, algo, epochs):
    """With one minibatch the old log-probs come from the update's own first forward (no rollout pass), kept for
    the later epochs; the gradients of every optimizer step and the logged numbers (the rollout's KL included)
    equal those of a run that computes them in the rollout."""
    from chatforge.stages import grpo

    def make_cfg():
        return load_config("grpo", MICRO, rl_overrides(world, 2, f"rl.algo={algo}", "rl.prompts_per_step=3",
                                                       "rl.group_size=3", "rl.minibatches=1", f"rl.ppo_epochs={epochs}",
                                                       "rl.grpo_kl_coef=0.1", "rl.missing_eos_penalty=null",
                                                       "train.device=cpu", "train.batch_size=4"))

    rl = make_cfg().rl
    assert grpo.old_logp_from_update(rl, 9)
    rl.minibatches = 2
    assert not grpo.old_logp_from_update(rl, 9) and grpo.old_logp_from_update(rl, 1)  # 1 row: one minibatch
    lazy = captured_grads(monkeypatch, lambda: grpo.run(make_cfg(), tmp_path / "lazy"))
    monkeypatch.setattr(grpo, "old_logp_from_update", lambda rl, rows: False)
    eager = captured_grads(monkeypatch, lambda: grpo.run(make_cfg(), tmp_path / "eager"))
    assert len(lazy) == 2 * epochs
    assert_same_grads(lazy, eager)
    a, b = train_rows(tmp_path / "lazy"), train_rows(tmp_path / "eager")
    assert all("logp_s" not in r for r in a) and all("logp_s" in r for r in b)  # the pass was skipped
    if epochs == 1:
        assert all(r["clipfrac"] == 0.0 and r["approx_kl"] == 0.0 for r in a)  # ratio exactly 1
    else:
        assert all(r["approx_kl"] > 0.0 for r in a)  # the second epoch's ratios moved from the kept log-probs
    for key in ("loss", "policy_loss", "kl_loss", "kl", "reward", "entropy", "grad_norm"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("overhead", [None, 0.0])
def test_ppo_old_logprobs_and_values_from_the_update_equal_rollout_passes(monkeypatch, tmp_path, world, overhead):
    """When the update's first optimizer step reads the whole rollout (one minibatch of at most train.batch_size
    rows), its own forward gives the old log-probs and values; every optimizer step's gradients (two epochs) and
    the logged numbers equal those of a run that computes them in rollout passes. ``overhead`` 0: the step's rows
    in several length-sorted chunks, whose graphs are all kept until the advantages exist."""
    from chatforge.stages import ppo

    if overhead is not None:
        monkeypatch.setattr(ppo, "call_overhead_tokens", lambda *a, **k: overhead)

    def make_cfg():
        return load_config("ppo", MICRO, rl_overrides(world, 2, "rl.prompts_per_step=6", "rl.minibatches=1",
                                                      "rl.ppo_epochs=2", "rl.kl_coef=0.2",
                                                      "rl.missing_eos_penalty=null", "train.device=cpu",
                                                      "train.batch_size=8"))

    real = ppo.first_step_reads_rollout
    assert real(make_cfg().rl, 6, 8, 1, 0.0) and not real(make_cfg().rl, 6, 4, 1, 0.0)
    assert not real(make_cfg().rl, 6, 8, 2, 0.0) and real(make_cfg().rl, 6, 8, 2, ppo.FEWEST_CHUNKS)
    lazy = captured_grads(monkeypatch, lambda: ppo.run(make_cfg(), tmp_path / "lazy"))
    monkeypatch.setattr(ppo, "first_step_reads_rollout", lambda *a: False)
    eager = captured_grads(monkeypatch, lambda: ppo.run(make_cfg(), tmp_path / "eager"))
    assert len(lazy) == 2 * 2
    assert_same_grads(lazy, eager)
    a, b = train_rows(tmp_path / "lazy"), train_rows(tmp_path / "eager")
    assert any(0.0 < r["eos_fraction"] < 1.0 for r in a), "the responses must differ in length for this test"
    assert all("logp_s" not in r and "value_s" not in r for r in a)  # the passes were skipped
    assert all("logp_s" in r and "value_s" in r for r in b)
    for key in ("loss", "policy_loss", "value_loss", "kl", "non_score_reward", "reward", "entropy", "approx_kl",
                "explained_variance", "grad_norm_actor", "grad_norm_critic"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-6), key
