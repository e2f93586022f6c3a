"""Scale-out under torchrun: 2 CPU processes (gloo) against 1 process with doubled accumulation.

Few launches, because each torchrun start costs seconds of imports per process: ONE launch of
tests/dist_worker.py runs every 2-rank stage run in sequence (pretrain with DDP, resumes across
world sizes, pretrain with FSDP2, then sft, rm, dpo, ppo and grpo where chatforge/stages/<name>.py
exists); the 1-rank references run in this process. A second launch checks that a mismatched
collective fails after the process-group timeout instead of hanging.

Hang-proofing: every launch runs with ``dist.timeout_s`` small, in its own process group that is
killed at a wall-clock limit, and every test carries a pytest timeout.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chatforge.config import load_config
from chatforge.metrics import read_metrics
from tests.conftest import ROOT

pytestmark = [pytest.mark.dist, pytest.mark.timeout(420)]

MICRO = ROOT / "configs" / "micro.yaml"
WORKER = ROOT / "tests" / "dist_worker.py"
STAGES = ROOT / "chatforge" / "stages"
LAUNCH_LIMIT_S = 360  # the whole plan; its process group is killed after this
PG_TIMEOUT_S = 60.0  # dist.timeout_s of the stage runs
STEPS = 10  # pretraining steps compared
A = 2  # accumulation of the 1-rank reference (the 2-rank runs use A // 2)
COMMON = ["train.threads=1", "train.log_every=1", "train.eval_every=0", "train.eval_batches=2",
          "train.progress=false", "train.dtype=fp32", f"dist.timeout_s={PG_TIMEOUT_S}"]
FINETUNE_STEPS = 8
RL_STEPS = 2


def have(stage: str) -> bool:
    return (STAGES / f"{stage}.py").is_file()


def train_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(out) if r.get("kind") == "train"]


def losses_of(out: Path) -> list[float]:
    return [r["loss"] for r in train_rows(out)]


def launch(args: list[str], limit_s: float) -> tuple[int, str, float]:
    """torchrun --nproc_per_node=2 tests/dist_worker.py ARGS in its own process group, killed at limit_s."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(WORKER), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # torchrun and every worker it started
        out, _ = p.communicate()
        pytest.fail(f"torchrun launch did not finish in {limit_s}s (a hang?)\n{out[-4000:]}")
    return p.returncode, out, time.time() - t0


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Demo data and one tokenizer shared by every run (so their token streams are identical)."""
    from chatforge.data.pretrain import corpus_files, iter_documents
    from chatforge.demo.files import write_world
    from chatforge.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("dworld")
    files = write_world(root, seed=0, corpus_mb=0.15, n_sft=200, n_pairs=200, n_rl_prompts=64, n_eval_prompts=0)
    tok_dir = root / "tokenizer"
    train_tokenizer(iter_documents(corpus_files([str(files["corpus"])])), 512).save(tok_dir)
    return {**files, "tokenizer": tok_dir, "root": root}


def pretrain_overrides(world: dict, accum: int, steps: int, *extra: str) -> list[str]:
    # decay_steps fixed: the LR schedule must not depend on where a run stops
    return [f"data.path=[{world['corpus']}]", f"tokenizer.path={world['tokenizer']}", f"train.grad_accum={accum}",
            f"train.max_steps={steps}", f"optim.decay_steps={STEPS}", "train.ckpt_every=5",
            "data.shard_tokens=4096", *COMMON, *extra]  # small shards: batches and resumes read across shards


def finetune_overrides(stage: str, world: dict, base: Path, accum: int) -> list[str]:
    data = {"sft": world["sft"], "rm": world["preferences"], "dpo": world["preferences"]}[stage]
    extra = {"sft": ["sft.n_eval_prompts=0"], "rm": ["rm.norm_samples=16"]}.get(stage, [])
    return [f"model.init={base}", f"data.path=[{data}]", f"train.grad_accum={accum}", "train.batch_size=4",
            f"train.max_steps={FINETUNE_STEPS}", "train.ckpt_every=0", "optim.warmup_steps=2", *COMMON, *extra]


def rl_overrides(stage: str, world: dict, base: Path) -> list[str]:
    extra = ["rl.prompts_per_step=4"] if stage == "ppo" else ["rl.prompts_per_step=2", "rl.group_size=4"]
    return [f"model.init={base}", f"data.path=[{world['rl_prompts']}]", "rl.reward_fn=tests.rewards:letter_e",
            "rl.max_new_tokens=8", "rl.missing_eos_penalty=null", "rl.ppo_epochs=2", "rl.minibatches=2",
            "rl.sample_every=0", "train.batch_size=2", f"train.max_steps={RL_STEPS}", "train.ckpt_every=0", "optim.warmup_steps=1", *COMMON, *extra]


def run_stage(stage: str, out: Path, overrides: list[str]) -> None:
    import importlib

    importlib.import_module(f"chatforge.stages.{stage}").run(load_config(stage, MICRO, overrides), out)


@pytest.fixture(scope="module")
def refs(world) -> dict:
    """The 1-process references, accumulation 2A: pretraining (uninterrupted, and stopped at step 5)
    and the fine-tuning stages started from that base model."""
    root = world["root"] / "ref"
    out = {"pretrain": root / "pretrain", "pretrain5": root / "pretrain5"}
    run_stage("pretrain", out["pretrain"], pretrain_overrides(world, A, STEPS))
    run_stage("pretrain", out["pretrain5"], pretrain_overrides(world, A, 5))
    for stage in ("sft", "rm", "dpo"):
        if have(stage):
            out[stage] = root / stage
            run_stage(stage, out[stage], finetune_overrides(stage, world, out["pretrain"], A))
    return out


@pytest.fixture(scope="module")
def two_ranks(world, refs) -> dict:
    """ONE torchrun launch (2 processes, gloo) running every 2-rank job; returns {name: out dir} + report."""
    w = world["root"] / "w"
    base = refs["pretrain"]
    jobs = [
        dict(name="ddp", stage="pretrain", out=w / "ddp", overrides=pretrain_overrides(world, A // 2, STEPS)),
        dict(name="ddp5", stage="pretrain", out=w / "ddp5", overrides=pretrain_overrides(world, A // 2, 5)),
        # 2 -> 2 ranks: resume the step-5 checkpoint just written
        dict(name="ddp5to10", stage="pretrain", out=w / "ddp5to10", copy_from=w / "ddp5",
             overrides=pretrain_overrides(world, A // 2, STEPS)),
        # 1 -> 2 ranks: resume the 1-process reference's step-5 checkpoint
        dict(name="from1", stage="pretrain", out=w / "from1", copy_from=refs["pretrain5"],
             overrides=pretrain_overrides(world, A // 2, STEPS)),
        dict(name="fsdp5", stage="pretrain", out=w / "fsdp5",
             overrides=pretrain_overrides(world, A // 2, 5, "dist.strategy=fsdp")),
    ]
    for stage in ("sft", "rm", "dpo"):
        if have(stage):
            jobs.append(dict(name=stage, stage=stage, out=w / stage,
                             overrides=finetune_overrides(stage, world, base, A // 2)))
    for stage in ("ppo", "grpo"):
        if have(stage):
            jobs.append(dict(name=stage, stage=stage, out=w / stage, spy=True,
                             overrides=rl_overrides(stage, world, base)))
    plan = {"timeout_s": PG_TIMEOUT_S, "report": str(w / "report.json"),
            "jobs": [{**j, "config": str(MICRO), "out": str(j["out"]),
                      "copy_from": str(j["copy_from"]) if j.get("copy_from") else None} for j in jobs]}
    w.mkdir(parents=True, exist_ok=True)
    (w / "plan.json").write_text(json.dumps(plan, indent=1))
    rc, log, secs = launch(["plan", str(w / "plan.json")], LAUNCH_LIMIT_S)
    assert rc == 0, f"2-rank launch failed (rc {rc}) after {secs:.0f}s:\n{log[-6000:]}"
    return {"dirs": {j["name"]: Path(j["out"]) for j in jobs}, "report": json.loads((w / "report.json").read_text()),
            "log": log}


def assert_close(got: list[float], want: list[float], what: str, tol: float = 1e-4) -> None:
    assert len(got) == len(want), f"{what}: {len(got)} logged steps, expected {len(want)}"
    worst = max(abs(g - w) for g, w in zip(got, want))
    assert worst < tol, f"{what}: max |diff| {worst:.2e}\n got  {got}\n want {want}"


# ----------------------------------------------------------------------------- tests


def test_pretrain_two_ranks_equal_one_rank_double_accum(two_ranks, refs):
    """2 ranks x accum 1 == 1 rank x accum 2 over 10 steps (losses and gradient norms), fp32."""
    ddp, ref = two_ranks["dirs"]["ddp"], refs["pretrain"]
    assert_close(losses_of(ddp), losses_of(ref), "pretrain loss")
    assert_close([r["grad_norm"] for r in train_rows(ddp)], [r["grad_norm"] for r in train_rows(ref)], "grad norm")
    assert losses_of(ddp)[-1] < losses_of(ddp)[0] - 0.3  # it trained
    # rank 0 alone logs: one row per step (two writers would double them), tokens are global
    assert [r["step"] for r in train_rows(ddp)] == list(range(1, STEPS + 1))
    assert train_rows(ddp)[0]["tokens"] == train_rows(ref)[0]["tokens"]
    # the batch arithmetic is printed at start
    assert "8 seqs x 64 tokens x 1 accumulation x 2 processes = 1,024 tokens per step" in two_ranks["log"]
    # the final weights agree too (saved once, by rank 0)
    from safetensors.torch import load_file

    a, b = load_file(ddp / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_resume_across_world_sizes(two_ranks, refs, world):
    """A step-5 checkpoint resumes exactly when batch_size x grad_accum x world is unchanged:
    2 -> 2 ranks, 1 -> 2 ranks (in the launch) and 2 -> 1 rank (here)."""
    ref = losses_of(refs["pretrain"])
    d = two_ranks["dirs"]
    assert_close(losses_of(d["ddp5to10"]), ref, "2->2 resume")
    assert_close(losses_of(d["from1"]), ref, "1->2 resume")
    to1 = world["root"] / "to1"
    shutil.copytree(d["ddp5"], to1)
    run_stage("pretrain", to1, pretrain_overrides(world, A, STEPS))
    assert_close(losses_of(to1), ref, "2->1 resume")


def test_fsdp_pretrain_matches_and_saves_loadable_dir(two_ranks, refs, world):
    """FSDP2 (fully_shard) on 2 CPU ranks: the same losses, a full HF directory written by rank 0, and a
    checkpoint that a single process resumes (full state dicts keyed by parameter names)."""
    fsdp = two_ranks["dirs"]["fsdp5"]
    assert_close(losses_of(fsdp), losses_of(refs["pretrain5"]), "fsdp loss")
    from chatforge.model.load import load_causal_lm

    model, mcfg, tok = load_causal_lm(fsdp)
    ref_model, _, _ = load_causal_lm(refs["pretrain5"])
    x = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        assert torch.allclose(model(x), ref_model(x), atol=1e-4)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(fsdp)
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4)
    to1 = world["root"] / "fsdp_to1"
    shutil.copytree(fsdp, to1)
    run_stage("pretrain", to1, pretrain_overrides(world, A, STEPS))
    assert_close(losses_of(to1), losses_of(refs["pretrain"]), "fsdp(2) -> 1 rank resume")


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_finetune_two_ranks_equal_one_rank(stage, two_ranks, refs):
    if not have(stage):
        pytest.skip(f"chatforge/stages/{stage}.py not present yet")
    got, want = losses_of(two_ranks["dirs"][stage]), losses_of(refs[stage])
    assert len(want) == FINETUNE_STEPS
    assert_close(got, want, f"{stage} loss")
    assert (two_ranks["dirs"][stage] / "model.safetensors").is_file()


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_rl_two_ranks_use_global_statistics(stage, two_ranks):
    """PPO/GRPO finish on 2 ranks; whitening and logged reward use the statistics of BOTH ranks' rollouts."""
    if not have(stage):
        pytest.skip(f"chatforge/stages/{stage}.py not present yet")
    out = two_ranks["dirs"][stage]
    assert (out / "model.safetensors").is_file() and (out / "chatforge.json").is_file()
    assert [r["step"] for r in train_rows(out)] == list(range(1, RL_STEPS + 1))
    rep = two_ranks["report"]["jobs"][stage]
    metrics = rep["metrics"]
    assert len(metrics) == RL_STEPS
    for m in metrics:
        assert m["rows_per_rank"][0] == m["rows_per_rank"][1] > 0  # each rank generated its own share
        for logged in m["logged_reward"]:  # every rank logs the mean over both ranks' responses
            assert logged == pytest.approx(m["global_mean"], abs=1e-5)
    if stage == "ppo":
        assert rep["whiten_calls_per_rank"][0] == rep["whiten_calls_per_rank"][1] == RL_STEPS
        distinct = False
        for c in rep["whiten"]:
            for mean, var, (lm, lv) in zip(c["used_mean"], c["used_var"], c["local"]):
                assert mean is not None and var is not None, "advantages whitened with local statistics"
                assert mean == pytest.approx(c["global_mean"], abs=1e-5)
                assert var == pytest.approx(c["global_var"], rel=1e-4, abs=1e-7)
                distinct |= abs(lm - c["global_mean"]) > 1e-4
        assert distinct, "the ranks' local statistics never differed from the global ones: the check is void"


def test_mismatched_collective_fails_fast():
    """Rank 1 skips an all-reduce and stays alive: rank 0 fails after the 5 s process-group timeout and
    torchrun ends the launch with an error, instead of hanging."""
    rc, log, secs = launch(["mismatch", "5"], limit_s=240)
    assert rc != 0, log[-3000:]
    assert "rank 0 collective failed after" in log, log[-3000:]
    waited = float(log.split("rank 0 collective failed after ")[1].split("s")[0])
    assert 4.0 <= waited < 60.0, log[-3000:]
    assert "rank 0 collective returned" not in log


@pytest.mark.slow
def test_fsdp_every_stage(world, refs):
    """FSDP2 on 2 CPU ranks for every later stage (a second launch): sft with eval samples generated
    mid-run, rm and dpo equal their 1-rank references; ppo and grpo finish and save their policy."""
    w = world["root"] / "fsdp_all"
    base = refs["pretrain"]
    jobs = []
    for stage in ("sft", "rm", "dpo"):
        if have(stage):
            extra = ["train.eval_every=4", "sft.n_eval_prompts=2", "sft.max_new_tokens=8"] if stage == "sft" else []
            jobs.append(dict(name=stage, stage=stage, out=str(w / stage), config=str(MICRO),
                             overrides=finetune_overrides(stage, world, base, A // 2) + ["dist.strategy=fsdp", *extra]))
    for stage in ("ppo", "grpo"):
        if have(stage):
            jobs.append(dict(name=stage, stage=stage, out=str(w / stage), config=str(MICRO),
                             overrides=rl_overrides(stage, world, base) + ["dist.strategy=fsdp"]))
    if have("ppo"):  # one minibatch of every row: the old log-probs and values from the update's first forward
        jobs.append(dict(name="ppo_one_minibatch", stage="ppo", out=str(w / "ppo_one_minibatch"), config=str(MICRO),
                         overrides=rl_overrides("ppo", world, base) + ["dist.strategy=fsdp", "rl.minibatches=1",
                                                                       "train.batch_size=4"]))
    w.mkdir(parents=True, exist_ok=True)
    (w / "plan.json").write_text(json.dumps({"timeout_s": PG_TIMEOUT_S, "report": str(w / "report.json"),
                                             "jobs": jobs}, indent=1))
    rc, log, secs = launch(["plan", str(w / "plan.json")], LAUNCH_LIMIT_S)
    assert rc == 0, f"FSDP launch failed (rc {rc}) after {secs:.0f}s:\n{log[-6000:]}"
    for j in jobs:
        out = Path(j["out"])
        assert (out / "model.safetensors").is_file(), j["name"]
        if j["name"] == "ppo_one_minibatch":
            rows = train_rows(out)
            assert len(rows) == RL_STEPS and all("logp_s" not in r and "value_s" not in r for r in rows), rows
            assert all(math.isfinite(r["loss"]) and math.isfinite(r["explained_variance"]) for r in rows), rows
        if j["name"] in refs:
            assert_close(losses_of(out), losses_of(refs[j["name"]]), f"fsdp {j['name']} loss")
