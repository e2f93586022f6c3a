"""Golden curves: a fixed-seed micro run of every post-pretraining stage reproduces its recorded numbers.

Every run starts from one micro base model and uses only data the repository makes itself (the demo world
generator, chatforge.demo), so a fresh clone passes with or without ../shared. Each train and eval row of
``metrics.jsonl`` (losses, rewards, KL, gradient norms, ... without wall-clock timings) is compared with
``tests/golden/<stage>_micro.json`` to float tolerance. A refactor must keep these numbers; a change that is
meant to change them re-records with ``CHATFORGE_UPDATE_GOLDEN=1`` and says so in its commit message.
(The pretraining golden is tests/test_pretrain.py::test_golden_loss_curve.)
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import pytest

from chatforge.config import load_config, to_dict
from chatforge.demo.files import write_world
from chatforge.metrics import read_metrics
from chatforge.rl.timing import PHASE_KEYS
from tests.conftest import ROOT

MICRO = ROOT / "configs" / "micro.yaml"
GOLDEN_DIR = Path(__file__).parent / "golden"
# Float tolerance: dividing the gradients by the global count after the backward (instead of scaling the loss
# before it) moves the weights by ~1e-7 relative, which a difference of log-probs (k1 KL) shows at ~1e-6 absolute.
RTOL, ATOL = 1e-5, 1e-5
# Keys that are wall-clock measurements, not numbers of the algorithm.
TIMING_KEYS = {"step_s", "elapsed_s", "tokens_per_s", "eval_s", "mfu", "lr_s", *PHASE_KEYS}
# Diagnostics that count float ties, compared to an absolute tolerance: PPO's vf_clipfrac counts tokens where
# (clip(v, v_old +- eps) - R)^2 > (v - R)^2, and inside the clip range v_old + (v - v_old) differs from v in the
# last bit, so a 1e-7 change of the weights flips some of those ties.
LOOSE = {"vf_clipfrac": 0.05}
# On the CPU whatever the machine has: the curves were recorded there (a GPU's kernels round differently).
QUIET = ["train.progress=false", "train.threads=1", "train.ckpt_every=0", "train.log_every=1", "train.device=cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Demo data files (a small corpus, conversations, preference pairs, RL prompts) and a micro base model."""
    from chatforge.stages import pretrain

    root = tmp_path_factory.mktemp("golden")
    paths = write_world(root / "world", seed=0, corpus_mb=0.1, n_sft=64, n_pairs=64, n_rl_prompts=32,
                        n_eval_prompts=0)
    run_checked(pretrain, load_config("pretrain", MICRO, [f"data.path=[{paths['corpus']}]", "model.block_size=128",
                                                 "train.max_steps=10", "train.eval_every=0", *QUIET]), root / "base")
    return {**paths, "base": root / "base", "root": root}


def curve(out: Path) -> list[dict]:
    """The comparable rows of a run: kind, step and every numeric metric but timings."""
    rows = []
    for r in read_metrics(out):
        if r.get("kind") not in ("train", "eval"):
            continue
        rows.append({k: v for k, v in r.items() if k not in TIMING_KEYS and (k in ("kind", "step")
                     or (isinstance(v, (int, float)) and not isinstance(v, bool)))})
    return rows


def close(a: float, b: float, key: str = "") -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=LOOSE.get(key, ATOL))


def diff_curves(got: list[dict], want: list[dict]) -> list[str]:
    """Human-readable differences (row, key, recorded, now); a key recorded but missing now is a difference."""
    out = []
    if len(got) != len(want):
        out.append(f"{len(want)} rows recorded, {len(got)} now")
    for i, (g, w) in enumerate(zip(got, want)):
        for k, wv in w.items():
            gv = g.get(k)
            if gv is None or (k in ("kind", "step") and gv != wv) or (k not in ("kind", "step") and not close(gv, wv, k)):
                out.append(f"row {i} ({w.get('kind')} step {w.get('step')}) {k}: recorded {wv!r}, now {gv!r}")
    return out


def check_golden(name: str, rows: list[dict]) -> None:
    path = GOLDEN_DIR / f"{name}_micro.json"
    if os.environ.get("CHATFORGE_UPDATE_GOLDEN"):
        path.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    want = json.loads(path.read_text())["rows"]
    problems = diff_curves(rows, want)
    assert not problems, f"{name} golden curve changed ({len(problems)} differences):\n" + "\n".join(problems[:40])


def test_diff_curves_reports_changes():
    """The comparison itself can fail: a changed value, a missing key and a missing row are all reported."""
    want = [{"kind": "train", "step": 1, "loss": 1.0, "kl": 0.0}, {"kind": "train", "step": 2, "loss": 0.5}]
    assert diff_curves([dict(r) for r in want], want) == []
    assert diff_curves([{**want[0], "loss": 1.0 + 1e-7}, want[1]], want) == []
    d = diff_curves([{**want[0], "loss": 1.001}, {"kind": "train", "step": 2}], want)
    assert any("loss: recorded 1.0, now 1.001" in x for x in d) and any("row 1" in x and "now None" in x for x in d)
    assert diff_curves(want[:1], want)[0] == "2 rows recorded, 1 now"


def run_checked(stage, cfg, out) -> None:
    """Run a stage and check that it left its config as it was given (read-only configs)."""
    before = copy.deepcopy(to_dict(cfg))
    stage.run(cfg, out)
    assert to_dict(cfg) == before, "the stage wrote into its config"


def run_sft(world, out):
    from chatforge.stages import sft

    run_checked(sft, load_config("sft", MICRO, [f"model.init={world['base']}", f"data.path=[{world['sft']}]",
                                       "train.max_steps=6", "train.eval_every=3", "train.eval_batches=2",
                                       "train.grad_accum=2", "train.batch_size=4", "sft.n_eval_prompts=0",
                                       *QUIET]), out)


def run_rm(world, out):
    from chatforge.stages import rm

    run_checked(rm, load_config("rm", MICRO, [f"model.init={world['base']}", f"data.path=[{world['preferences']}]",
                                     "data.val_fraction=0.25", "train.max_steps=6", "train.eval_every=3",
                                     "train.eval_batches=0", "train.batch_size=4", "train.grad_accum=2",
                                     "optim.lr=2e-3", "rm.norm_samples=16", *QUIET]), out)


def run_dpo(world, out):
    from chatforge.stages import dpo

    run_checked(dpo, load_config("dpo", MICRO, [f"model.init={world['base']}", f"data.path=[{world['preferences']}]",
                                       "data.val_fraction=0.25", "train.max_steps=6", "train.eval_every=3",
                                       "train.eval_batches=0", "train.batch_size=4", "train.grad_accum=2",
                                       "optim.lr=1e-3", "optim.warmup_steps=2", *QUIET]), out)


def rl_overrides(world, *extra: str) -> list[str]:
    return [f"model.init={world['base']}", f"data.path=[{world['rl_prompts']}]",
            "rl.reward_fn=tests.rewards:letter_e", "train.max_steps=4", "optim.warmup_steps=0",
            "optim.schedule=constant", "optim.lr=1e-3", "rl.max_new_tokens=12", "rl.sample_every=0",
            "rl.minibatches=2", "rl.ppo_epochs=2", "train.batch_size=2", "rl.missing_eos_penalty=null", *QUIET,
            *extra]


def run_ppo(world, out):
    from chatforge.stages import ppo

    run_checked(ppo, load_config("ppo", MICRO, rl_overrides(world, "rl.prompts_per_step=4", "rl.kl_coef=0.1")), out)


def run_grpo(world, out, algo="grpo"):
    from chatforge.stages import grpo

    algo_flag = [f"rl.algo={algo}"] if algo != "grpo" else []  # grpo: the stage resolves rl.algo's default itself
    run_checked(grpo, load_config("grpo", MICRO, rl_overrides(world, *algo_flag, "rl.prompts_per_step=2",
                                                     "rl.group_size=3", "rl.grpo_kl_coef=0.1")), out)


def run_rloo(world, out):
    run_grpo(world, out, "rloo")


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo", "ppo", "grpo", "rloo"])
def test_golden_curve(world, tmp_path, stage):
    """A fixed-seed micro run of ``stage`` reproduces its recorded metrics (refactors must keep the numbers)."""
    globals()[f"run_{stage}"](world, tmp_path / stage)
    rows = curve(tmp_path / stage)
    assert rows and any(r["kind"] == "train" for r in rows)
    resolved = json.loads((tmp_path / stage / "chatforge.json").read_text())["resolved"]
    assert resolved["model"]["n_layer"] == 2 and resolved["model"]["block_size"] == 128  # the base model's shape
    if stage in ("grpo", "rloo"):
        assert resolved["algo"] == stage
    check_golden(stage, rows)
