"""`chatforge pipeline` on a micro config: end to end, skip when finished, resume when interrupted, rerun
what changed (and everything downstream of it), --force, --stages."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from chatforge.config import ConfigError
from chatforge.pipeline import DIRS, Pipeline
from chatforge.pipeline_config import split_overrides
from chatforge.pipeline_graph import downstream
from chatforge.trainer import Interrupted, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_YAML = os.path.join(ROOT, "configs", "micro.yaml")
TINY_YAML = os.path.join(ROOT, "configs", "tiny.yaml")

# micro model (configs/micro.yaml) + a tiny demo world + a few steps per stage
MICRO = [
    "recipe.data=demo", "demo.corpus_mb=0.1", "demo.n_sft=120", "demo.n_pairs=40", "demo.n_rl_prompts=32", "demo.n_eval_prompts=8",
    "demo.n_sampled_pair_prompts=24", "demo.n_heldout_pairs=8", "demo.eval_max_new_tokens=8",
    "demo.eval_batch_size=16", "tokenizer.vocab_size=320", "train.max_steps=4", "train.eval_every=0",
    "train.ckpt_every=0", "train.log_every=1", "train.eval_batches=1", "sft.n_eval_prompts=0",
    "rl.max_new_tokens=8", "rl.prompts_per_step=4", "rl.ppo_epochs=1", "rl.sample_every=1",
    "train.threads=1",  # micro models run fastest on one thread (and do not thrash a busy machine)
]
STAGE_DIRS = ["base", "sft", "rm", "ppo"]


def run(out, *extra, stages=None, force=None):
    return Pipeline(MICRO_YAML, out, MICRO + list(extra), stages=stages, force=force, verbose=False).run()


def mtimes(root, dirs=STAGE_DIRS):
    return {d: ((root / d / "chatforge.json").stat().st_mtime_ns, (root / d / "model.safetensors").stat().st_mtime_ns)
            for d in dirs}


def losses(d):
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("kind") == "train"]


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, restore_threads):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pipeline") / "run"
    results = run(out)
    return out, results


@pytest.fixture
def copy_run(micro_run, tmp_path):
    src, _ = micro_run
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def test_end_to_end_writes_every_stage(micro_run):
    out, results = micro_run
    assert [s for s in results] == ["data", "tokenizer", "pretrain", "sft", "pairs", "rm", "ppo", "eval", "report"]
    assert all(r.status == "ran" for r in results.values())
    for d in STAGE_DIRS:
        info = json.loads((out / d / "chatforge.json").read_text())
        assert (out / d / "model.safetensors").is_file() and (out / d / "metrics.jsonl").is_file()
        assert info["pipeline"]["fingerprint"] and info["metrics"]["steps"] == 4
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    # wiring: sft starts from base, rm from sft, ppo from sft with rm as its reward model
    sft_cfg = json.loads((out / "sft" / "chatforge.json").read_text())["config"]
    ppo_cfg = json.loads((out / "ppo" / "chatforge.json").read_text())["config"]
    assert sft_cfg["model"]["init"] == str(out / "base") and ppo_cfg["model"]["init"] == str(out / "sft")
    assert ppo_cfg["rl"]["reward_model"] == str(out / "rm")
    # gold evaluation recorded where DESIGN.md says, on every held-out prompt, both decoding modes
    for d in ("base", "sft", "ppo"):
        info = json.loads((out / d / "chatforge.json").read_text())
        for k in ("gold_score", "gold_score_se", "gold_score_greedy", "gold_score_greedy_se"):
            assert 0.0 <= info[k] <= 1.0, (d, k)
        samples = [json.loads(x) for x in (out / d / "eval_samples.jsonl").read_text().splitlines()]
        assert len(samples) == 8 and {"prompt", "sampled", "greedy", "gold_sampled", "gold_greedy"} <= set(samples[0])
        assert abs(sum(s["gold_sampled"] for s in samples) / 8 - info["gold_score"]) < 1e-9
    ppo = json.loads((out / "ppo" / "chatforge.json").read_text())
    wr = ppo["win_rate_vs_sft"]["sampled"]
    assert wr["wins"] + wr["ties"] + wr["losses"] == 8 and wr["win_rate_lo"] <= wr["win_rate"] <= wr["win_rate_hi"]
    rm = json.loads((out / "rm" / "chatforge.json").read_text())
    assert 0.0 <= rm["accuracy"] <= 1.0 and rm["heldout_eval"]["n_pairs"] >= 1
    # the RM's pairs: sampled from the SFT model (labelled, noisy) + variants; held-out pairs carry gold labels
    stats = json.loads((out / "pairs" / "pipeline.json").read_text())["stats"]
    assert stats["variant_pairs"] == 40 and stats["sampled_pairs"] + stats["sampled_ties"] + stats["sampled_empty"] == 24
    from chatforge.demo.judge import gold_score

    heldout = [json.loads(line) for line in (out / "pairs" / "heldout.jsonl").read_text().splitlines()]
    for p in heldout:
        assert gold_score(p["prompt"], p["chosen"]) > gold_score(p["prompt"], p["rejected"])
    # accuracy broken down by what tells each pair apart; the groups partition the held-out pairs
    kinds = rm["heldout_eval"]["accuracy_by_kind"]
    assert set(kinds) <= {"style only", "content only", "style and content"}
    assert sum(k["n"] for k in kinds.values()) == len(heldout) == rm["heldout_eval"]["n_pairs"]
    assert sum(k["n"] * k["accuracy"] for k in kinds.values()) == pytest.approx(len(heldout) * rm["accuracy"])
    assert (out / "report.md").is_file() and (out / "ppo" / "kl_monitor.json").is_file()


def test_second_call_skips_finished_stages(copy_run):
    before = mtimes(copy_run)
    evals = {d: (copy_run / d / "eval_samples.jsonl").stat().st_mtime_ns for d in ("base", "sft", "ppo")}
    results = run(copy_run)
    assert {k: r.status for k, r in results.items() if k not in ("eval", "report")} == {
        "data": "skipped", "tokenizer": "skipped", "pretrain": "skipped", "sft": "skipped", "pairs": "skipped",
        "rm": "skipped", "ppo": "skipped"}
    assert mtimes(copy_run) == before  # no retraining, no rewritten run info
    assert {d: (copy_run / d / "eval_samples.jsonl").stat().st_mtime_ns for d in evals} == evals


def test_changed_config_reruns_stage_and_downstream(copy_run):
    before = mtimes(copy_run)
    old_rm = losses(copy_run / "rm")
    results = run(copy_run, "stages.rm.optim.lr=1e-2")
    status = {k: r.status for k, r in results.items()}
    assert status["pretrain"] == status["sft"] == status["pairs"] == "skipped"
    assert status["rm"] == "ran" and status["ppo"] == "ran"  # ppo's reward model changed
    after = mtimes(copy_run)
    assert after["base"] == before["base"] and after["sft"] == before["sft"]
    assert after["rm"] != before["rm"] and after["ppo"] != before["ppo"]
    assert losses(copy_run / "rm") != old_rm
    # and back: the original config reruns rm (its fingerprint differs again), not sft
    status = {k: r.status for k, r in run(copy_run).items()}
    assert status["sft"] == "skipped" and status["rm"] == "ran"


def test_interrupted_stage_resumes_exactly(copy_run, micro_run, monkeypatch):
    original, _ = micro_run
    shutil.rmtree(copy_run / "sft")
    real_fit = Trainer.fit

    def fit_interrupted_in_step_3(self, step_fn, eval_fn=None, **kw):
        def step(s):
            if s == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return step_fn(s)
        return real_fit(self, step, eval_fn, **kw)

    monkeypatch.setattr(Trainer, "fit", fit_interrupted_in_step_3)
    with pytest.raises(Interrupted):
        run(copy_run, stages=["sft"])
    assert (copy_run / "sft" / "checkpoint" / "state.pt").is_file()
    assert not (copy_run / "sft" / "chatforge.json").exists()
    monkeypatch.setattr(Trainer, "fit", real_fit)
    results = run(copy_run, stages=["sft"])
    assert results["sft"].status == "resumed"
    assert losses(copy_run / "sft") == losses(original / "sft")  # the same run as uninterrupted
    # identical weights -> the stages after sft are still up to date
    results = run(copy_run)
    assert results["pairs"].status == results["rm"].status == results["ppo"].status == "skipped"


def test_force_reruns_stage_and_invalidates_downstream(copy_run):
    before = mtimes(copy_run)
    results = run(copy_run, force=["rm"])
    status = {k: r.status for k, r in results.items()}
    assert status["sft"] == "skipped" and status["rm"] == "ran" and status["ppo"] == "ran"
    after = mtimes(copy_run)
    assert after["sft"] == before["sft"] and after["ppo"] != before["ppo"]
    assert downstream("sft") == ["sft", "pairs", "rm", "ppo", "dpo", "grpo", "eval", "report"]


def test_stages_picks_a_subset_and_checks_upstream(tmp_path):
    results = run(tmp_path / "r", stages=["base"])
    assert list(results) == ["data", "tokenizer", "pretrain"]
    assert not (tmp_path / "r" / "sft").exists()
    with pytest.raises(ConfigError, match="need a finished sft/"):
        run(tmp_path / "r", stages=["rm"])
    with pytest.raises(ConfigError, match="needs a finished sft/"):
        run(tmp_path / "r", stages=["ppo"])
    with pytest.raises(ConfigError, match="unknown stage"):
        run(tmp_path / "r", stages=["sfft"])


def test_stage_overrides_apply_to_one_stage():
    shared, per = split_overrides(["optim.lr=1", "stages.ppo.rl.kl_coef=0.3"])
    assert shared == ["optim.lr=1"] and per == {"ppo": ["rl.kl_coef=0.3"]}
    p = Pipeline(TINY_YAML, "/nonexistent", ["stages.ppo.rl.kl_coef=0.3"], verbose=False)
    assert p.stage_config("ppo").rl.kl_coef == 0.3 and p.stage_config("rm").rl.kl_coef != 0.3
    with pytest.raises(ConfigError, match="stages.<stage>"):
        split_overrides(["stages.nope.x=1"])


def test_tiny_yaml_resolves_for_every_stage():
    p = Pipeline(TINY_YAML, "/nonexistent", verbose=False)
    assert p.selected == ["data", "tokenizer", "pretrain", "sft", "pairs", "rm", "ppo", "eval", "report"]
    assert p.is_demo and p.demo.label_noise == 0.1 and p.demo.n_eval_prompts >= 200
    for stage in DIRS:
        cfg = p.stage_config(stage)
        assert cfg.stage == stage and not hasattr(cfg, "demo")  # the demo's settings are the pipeline's


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the whole demo on the tests' one thread: 17 minutes here
def test_tiny_pipeline_meets_acceptance(tmp_path):
    """The full `make demo` run (minutes): base < SFT < PPO (sampled, gain > 2 SE), PPO >= SFT greedy,
    win rate > 50%, RM held-out accuracy >= 85% with 10% label noise."""
    import math

    out = tmp_path / "tiny"
    Pipeline(TINY_YAML, out, ["train.progress=false"], verbose=True).run()
    info = {d: json.loads((out / d / "chatforge.json").read_text()) for d in STAGE_DIRS}
    b, s, p = info["base"], info["sft"], info["ppo"]
    assert b["gold_score"] < s["gold_score"] < p["gold_score"]
    assert p["gold_score"] - s["gold_score"] > 2 * math.hypot(p["gold_score_se"], s["gold_score_se"])
    assert p["gold_score_greedy"] >= s["gold_score_greedy"]
    assert p["win_rate_vs_sft"]["sampled"]["win_rate"] > 0.5
    assert info["rm"]["accuracy"] >= 0.85
