"""A micro chat policy for the RL tests (tests/test_ppo.py, tests/test_grpo.py), built once per process.

Pretrain (configs/micro.yaml) on a small generated demo corpus, then SFT on demo conversations, so the
policy answers in the chat format and ends its turns with <|end|>. Everything is written under the
pytest base temp folder and cached for the session (both test files share it).
"""

from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path

import pytest
import torch

from chatforge.config import load_config
from chatforge.demo.files import write_world
from chatforge.rl.timing import PHASE_KEYS

ROOT = Path(__file__).resolve().parents[1]
MICRO = ROOT / "configs" / "micro.yaml"


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread (and 2 threads collapse on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@functools.lru_cache(maxsize=1)
def micro_world(root: str) -> dict:
    """{'policy': SFT model dir, 'base': base dir, 'prompts': rl_prompts.jsonl} built under ``root``."""
    from chatforge.stages import pretrain, sft

    root = Path(root)
    done = root / "world.json"
    if done.is_file():  # built by an earlier process (a developer's reruns)
        return json.loads(done.read_text())
    paths = write_world(root / "world", seed=0, corpus_mb=0.25, n_sft=600, n_pairs=10, n_rl_prompts=300,
                        n_eval_prompts=10)
    common = ["train.threads=1", "train.eval_every=0", "train.ckpt_every=0", "train.progress=false"]
    with one_thread():
        pretrain.run(load_config("pretrain", MICRO, [f"data.path=[{paths['corpus']}]", "train.max_steps=60",
                                                     "data.val_split=tail",  # the token stream these RL tests were tuned on
                                                     *common]), root / "base")
        policy = root / "base"
        try:
            sft.run(load_config("sft", MICRO, [f"data.path=[{paths['sft']}]", f"model.init={root / 'base'}",
                                               "train.max_steps=60", "optim.lr=2e-3", *common]), root / "sft")
            policy = root / "sft"
        except Exception as e:  # SFT is another stage's code; the RL tests then start from the base model
            print(f"rl tests: SFT failed ({e!r}); using the base model")
    world = {"policy": str(policy), "base": str(root / "base"), "prompts": str(paths["rl_prompts"]),
             "sft_ok": policy == root / "sft"}
    done.write_text(json.dumps(world))
    return world


def rl_overrides(world: dict, steps: int, *extra: str) -> list[str]:
    """Overrides of a small RL run on the micro policy with the 'e'-share reward."""
    return [f"model.init={world['policy']}", f"data.path=[{world['prompts']}]", "rl.reward_fn=tests.rewards:letter_e",
            f"train.max_steps={steps}", "train.threads=1", "train.progress=false", "train.ckpt_every=0",
            "train.log_every=1", "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-3",
            "rl.max_new_tokens=16", "rl.prompts_per_step=8", "rl.sample_every=5", *extra]


def train_rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["kind"] == "train"]


TIMING_KEYS = ("step_s", "elapsed_s", "tokens_per_s", *PHASE_KEYS)


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without wall-clock timings (what an exact resume must reproduce)."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the RL stages receive SIGINT during (0-based) step ``step`` (when its rollout draws its prompts): the
    Trainer finishes that step, saves a checkpoint and raises trainer.Interrupted."""
    import os
    import signal

    from chatforge.rl.prompts import PromptLoader

    original = PromptLoader.next
    calls = {"n": 0}

    def next_prompts(self):
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
        calls["n"] += 1
        return original(self)

    monkeypatch.setattr(PromptLoader, "next", next_prompts)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The micro RL world (see :func:`micro_world`), shared by every RL test module in the session."""
    return micro_world(str(tmp_path_factory.getbasetemp() / "rl_micro"))


@pytest.fixture(autouse=True)
def single_thread():
    """Every test of a module that imports this fixture runs on one thread (see :func:`one_thread`)."""
    with one_thread():
        yield
