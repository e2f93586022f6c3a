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
