"""The steps of a recipe that reads the user's files (``recipe.data: files``): the data step (the RL prompts
split into RL training and held-out evaluation prompts) and the wiring of each stage's config to the run
directory. The demo world's steps live in :mod:`chatforge.demo_steps`.

Each takes the :class:`chatforge.pipeline.Pipeline` it runs for.
"""

from __future__ import annotations

import json
import random

from chatforge.checkpoint import atomic_write_json, atomic_write_text
from chatforge.config import Config, ConfigError
from chatforge.recipe_plan import upstream_model
from chatforge.rundir import file_digest
from chatforge.steps import StepResult, data_digest, digest, path_digest


def recipe_data(pipe) -> StepResult:
    """The user's files: the RL prompts split into RL training and evaluation prompts (when the recipe
    evaluates on a held-out share of them), written to data/ with their digests in data/recipe.json."""
    from chatforge.data.prompts import read_prompts

    ev, rl = pipe.recipe.eval, pipe.rl_stage()
    rl_paths = pipe.stage_config(rl).data.path if rl else []
    spec = {"eval_prompts": data_digest(ev.prompts) if ev.prompts else None,
            "rl_prompts": data_digest(rl_paths) if rl_paths else None, "heldout": ev.heldout_prompts,
            "max_prompts": ev.max_prompts, "seed": ev.seed}
    fp = digest(spec)
    meta = pipe.data_dir / "recipe.json"
    if "data" not in pipe.force and meta.is_file():
        rec = json.loads(meta.read_text())
        if rec.get("fingerprint") == fp and all(pipe.data_file(k).is_file() for k in rec.get("stats", {})):
            return StepResult("skipped")
    pipe.data_dir.mkdir(parents=True, exist_ok=True)

    def as_json(p) -> object:  # one user message -> a string (the demo's and most files' form)
        m = p.messages
        return m[0]["content"] if len(m) == 1 and m[0]["role"] == "user" else m

    def write(name: str, prompts: list) -> None:
        atomic_write_text(pipe.data_file(name), "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    stats: dict = {}
    for name in ("rl_prompts", "eval_prompts"):
        pipe.data_file(name).unlink(missing_ok=True)
    if ev.prompts:
        evp = [as_json(p) for p in read_prompts(ev.prompts)]
    elif rl_paths:
        rlp = [as_json(p) for p in read_prompts(rl_paths)]
        n = min(ev.heldout_prompts, len(rlp) // 2)
        held = set(random.Random(f"chatforge-eval-split-{ev.seed}").sample(range(len(rlp)), n))
        evp = [p for i, p in enumerate(rlp) if i in held]
        write("rl_prompts", [p for i, p in enumerate(rlp) if i not in held])
        stats["rl_prompts"] = len(rlp) - n
    else:
        evp = []
    if ev.max_prompts:
        evp = evp[:ev.max_prompts]
    if evp:
        write("eval_prompts", evp)
        stats["eval_prompts"] = len(evp)
    atomic_write_json(meta, {"fingerprint": fp, "spec": spec, "stats": stats})
    return StepResult("ran", detail=stats)


def wire_files(pipe, stage: str) -> tuple[Config, dict]:
    cfg = pipe.stage_config(stage)
    inputs: dict = {}
    up = upstream_model(stage, pipe.plan)
    if up:
        cfg.model.init = pipe.need(stage, up, inputs)
        cfg.tokenizer.path = None
    elif cfg.model.init:
        inputs["model_init"] = path_digest(cfg.model.init)
    if stage == "pretrain" and "tokenizer" in pipe.plan:
        cfg.tokenizer.path = str(pipe.path("tokenizer"))
        inputs["tokenizer"] = file_digest(pipe.path("tokenizer") / "tokenizer.json")
    if stage in ("rm", "dpo"):
        if "pairs" in pipe.plan:
            pairs = pipe.root / "pairs" / "train.jsonl"
            if not pairs.is_file():
                raise ConfigError(f"stage {stage} needs the comparisons in {pairs}; run --stages pairs first "
                                  "(or without --stages)")
            cfg.data.path = [str(pairs)]
        elif stage == "dpo" and not cfg.data.path:
            cfg.data.path = list(pipe.stage_config("rm").data.path)
    if stage in ("ppo", "grpo"):
        if "rm" in pipe.plan:
            cfg.rl.reward_model = pipe.need(stage, "rm", inputs)
        elif cfg.rl.reward_model:
            inputs["reward_model"] = path_digest(cfg.rl.reward_model)
        if pipe.data_file("rl_prompts").is_file():  # the RL prompts less the held-out evaluation prompts
            cfg.data.path = [str(pipe.data_file("rl_prompts"))]
    if cfg.data.path:
        inputs["data"] = data_digest(cfg.data.path)
    if cfg.data.val_path:
        inputs["val_data"] = data_digest(cfg.data.val_path)
    return cfg, inputs
