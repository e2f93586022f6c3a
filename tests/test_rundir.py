"""A stage's --out: another stage's run is refused, a checkpoint resumes only the inputs it was written for,
a finished run is left as it is, and a failed run leaves no folder behind (chatforge.stages.common.stage_entry,
chatforge.rundir)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.config import load_config
from chatforge.demo.files import write_world
from chatforge.metrics import read_metrics
from chatforge.rundir import OutDirError, input_changes, run_inputs
from chatforge.stages import pretrain, sft
from tests.conftest import ROOT

MICRO = ROOT / "configs" / "micro.yaml"
QUIET = ["train.progress=false", "train.threads=1", "train.eval_every=0", "train.log_every=1"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return write_world(tmp_path_factory.mktemp("world"), seed=0, corpus_mb=0.05, n_sft=32, n_pairs=0,
                       n_rl_prompts=0, n_eval_prompts=0)


def base_cfg(world, *extra: str):
    return load_config("pretrain", MICRO, [f"data.path=[{world['corpus']}]", "train.max_steps=2",
                                           "train.ckpt_every=1", *QUIET, *extra])


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in read_metrics(out) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def base(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base") / "base"
    pretrain.run(base_cfg(world), out)
    return out


def test_another_stages_run_is_refused(world, base):
    """sft into a pretrain folder stops with one line naming the folder and the stage it holds (it used to resume
    the base model's checkpoint and overwrite it)."""
    before = (base / "model.safetensors").read_bytes()
    cfg = load_config("sft", MICRO, [f"model.init={base}", f"data.path=[{world['sft']}]", *QUIET])
    with pytest.raises(OutDirError, match=rf"--out {base} holds a pretrain run; give sft another --out"):
        sft.run(cfg, base)
    assert (base / "model.safetensors").read_bytes() == before


def test_resume_only_with_the_same_inputs(world, tmp_path, capsys):
    out = tmp_path / "base"
    pretrain.run(base_cfg(world), out)  # 2 steps, checkpointed
    with pytest.raises(OutDirError, match=r"for other inputs \(changed: optim.lr 0.003 -> 0.001\).*--train.restart"):
        pretrain.run(base_cfg(world, "train.max_steps=4", "optim.lr=1e-3"), out)
    capsys.readouterr()
    pretrain.run(base_cfg(world, "train.max_steps=4"), out)  # the same inputs, more steps: resumed
    assert "pretrain: resuming from step 2" in capsys.readouterr().out
    assert train_steps(out) == [1, 2, 3, 4]
    pretrain.run(base_cfg(world, "train.max_steps=3", "optim.lr=1e-3", "train.restart=true"), out)
    assert "resuming" not in capsys.readouterr().out and train_steps(out) == [1, 2, 3]
    assert json.loads((out / "chatforge.json").read_text())["config"]["optim"]["lr"] == 1e-3


def test_changed_data_file_is_named(world, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(Path(world["corpus"]).read_text())
    cfg = lambda: load_config("pretrain", MICRO, [f"data.path=[{data}]", "train.max_steps=2", *QUIET])  # noqa: E731
    a = run_inputs(cfg())
    data.write_text(data.read_text() + " more text")
    assert input_changes(a, run_inputs(cfg())) == ["data files"]


def test_a_finished_run_is_left_as_it_is(world, base, capsys):
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    metrics = pretrain.run(base_cfg(world), base)
    assert "holds this run, finished (2 steps); nothing to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()} == files  # nothing rewritten
    assert metrics["steps"] == 2


def test_a_failed_run_leaves_no_folder(world, base, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "no user turn"}]}) + "\n")
    out = tmp_path / "sft"
    with pytest.raises(Exception, match="bad.jsonl"):
        sft.run(load_config("sft", MICRO, [f"model.init={base}", f"data.path=[{bad}]", *QUIET]), out)
    assert not out.exists()
