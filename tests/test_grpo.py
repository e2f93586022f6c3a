"""GRPO and RLOO (critic-free RL): learning runs on a micro policy, exact resume, configuration errors."""

import json
import math

import pytest

from chatforge.config import ConfigError, load_config
from chatforge.stages import grpo
from chatforge.trainer import Interrupted
from tests.rl_fixtures import (  # noqa: F401  (world, single_thread: fixtures)
    MICRO, comparable, interrupt_at, rl_overrides, single_thread, train_rows, world,
)


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_critic_free_rl_raises_reward(tmp_path, world, algo):
    """4 prompts x 4 samples per step, 15 steps: the 'e'-share reward rises clearly."""
    out = tmp_path / algo
    grpo.run(load_config("grpo", MICRO, rl_overrides(world, 15, f"rl.algo={algo}", "rl.missing_eos_penalty=null",
                                                     "rl.max_new_tokens=24", "rl.prompts_per_step=4",
                                                     "rl.group_size=4")), out)
    rows = train_rows(out)
    assert len(rows) == 15
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    print(f"{algo} micro: reward {first:.3f} -> {last:.3f}")
    assert last > first + 0.05, (first, last)
    for key in ("reward_raw", "entropy", "response_length", "eos_fraction", "clipfrac", "approx_kl", "policy_loss",
                "zero_std_groups", "grad_norm"):
        assert key in rows[-1] and math.isfinite(rows[-1][key]), key
    info = json.loads((out / "chatforge.json").read_text())
    assert info["algo"] == algo and info["config"]["rl"]["algo"] == algo
    assert (out / "model.safetensors").is_file()


def test_grpo_exact_resume_with_kl_and_sequence_averaging(tmp_path, world, monkeypatch):
    extra = ("rl.prompts_per_step=2", "rl.group_size=3", "rl.max_new_tokens=10", "rl.minibatches=2",
             "rl.ppo_epochs=2", "rl.grpo_kl_coef=0.1", "rl.loss_averaging=sequence", "train.batch_size=2")
    cfg = lambda: load_config("grpo", MICRO, rl_overrides(world, 4, *extra))  # noqa: E731
    grpo.run(cfg(), tmp_path / "full")
    interrupt_at(monkeypatch, 2)
    with pytest.raises(Interrupted):
        grpo.run(cfg(), tmp_path / "resumed")
    monkeypatch.undo()
    grpo.run(cfg(), tmp_path / "resumed")
    full, resumed = comparable(train_rows(tmp_path / "full")), comparable(train_rows(tmp_path / "resumed"))
    assert len(full) == 4 and full == resumed
    assert full[0]["kl"] == 0.0 and all("kl_loss" in r for r in full)  # the reference is kept when the coef > 0


def test_grpo_config_errors(tmp_path, world):
    with pytest.raises(ConfigError, match="at least 2"):
        grpo.run(load_config("grpo", MICRO, rl_overrides(world, 1, "rl.group_size=1")), tmp_path / "a")
    with pytest.raises(ConfigError, match="exactly one"):
        grpo.run(load_config("grpo", MICRO, rl_overrides(world, 1, "rl.reward_fn=null")), tmp_path / "b")


def record_optimizers(monkeypatch) -> list:
    """Every optimizer the trainer makes, in order (actor first, then the critic in PPO)."""
    import chatforge.trainer as trainer_mod

    made, real = [], trainer_mod.make_optimizer

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(trainer_mod, "make_optimizer", spy)
    return made


def test_rl_actor_has_no_weight_decay_by_default(tmp_path, world, monkeypatch):
    """RL-specific default: rl.weight_decay = 0 (the KL term keeps the policy near its start, as in TRL), whatever
    optim.weight_decay the shared sections set; rl.weight_decay applies when given."""
    made = record_optimizers(monkeypatch)
    short = ("rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=4", "rl.ppo_epochs=1",
             "optim.weight_decay=0.1")
    grpo.run(load_config("grpo", MICRO, rl_overrides(world, 1, *short)), tmp_path / "a")
    assert len(made) == 1 and [g["weight_decay"] for g in made[0].param_groups] == [0.0, 0.0]
    grpo.run(load_config("grpo", MICRO, rl_overrides(world, 1, *short, "rl.weight_decay=0.05")), tmp_path / "b")
    assert [g["weight_decay"] for g in made[1].param_groups] == [0.05, 0.0]  # matrices only
