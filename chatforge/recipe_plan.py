"""The recipe's plan: which training stages and tokenizer/pairs steps a run has, checked before any work (a
missing file, an unknown stage or a stage without its required input is one line naming the stage and the key).

recipe_plan and check_recipe_files take the :class:`chatforge.pipeline.Pipeline` they plan for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from chatforge.config import ConfigError
from chatforge.pipeline_graph import TRAIN_STAGES


def recipe_plan(pipe) -> list[str]:
    """The recipe's training stages plus its tokenizer/pairs steps, checked before any work: a missing file,
    an unknown stage or a stage without its required input is one line naming the stage and the key."""
    train = list(dict.fromkeys(pipe.recipe.stages))
    if pipe.is_demo and pipe.demo.dpo and "dpo" not in train:
        train.append("dpo")
    if "sft" in train and "pretrain" in train and pipe.stage_config("sft").model.init:
        train.remove("pretrain")
        pipe.notes.append("sft starts from stages.sft.model.init: no tokenizer or pretrain steps")
    plan = [s for s in TRAIN_STAGES if s in train]
    if not pipe.is_demo:
        check_recipe_files(pipe, plan)
    steps = list(plan)
    if "pretrain" in plan:
        pre = pipe.stage_config("pretrain")
        if pipe.is_demo or not (pre.tokenizer.path or pre.model.init):
            steps.append("tokenizer")
    if ("rm" in plan or "dpo" in plan) and (pipe.is_demo or pipe.recipe.comparisons.source != "file"):
        steps.append("pairs")
    return steps


def check_recipe_files(pipe, plan: list[str]) -> None:
    def need_paths(stage: str, paths: list[str], key: str, what: str) -> None:
        if not paths:
            raise ConfigError(f"stage {stage}: {key} is empty; name {what}")
        for p in paths:
            if not Path(p).exists():
                raise ConfigError(f"stage {stage}: {key}: no such file or folder '{p}'")

    def need_dir(stage: str, path: Optional[str], key: str) -> None:
        if path and not Path(path).is_dir():
            raise ConfigError(f"stage {stage}: {key}: no such model directory '{path}'")

    comp = pipe.recipe.comparisons
    for stage in plan:
        cfg = pipe.stage_config(stage)
        key = f"stages.{stage}"
        need_dir(stage, cfg.model.init, f"{key}.model.init")
        if stage == "pretrain":
            need_paths(stage, cfg.data.path, f"{key}.data.path", "the pretraining text files")
        elif stage == "sft":
            need_paths(stage, cfg.data.path, f"{key}.data.path", "the demonstration files")
        elif stage in ("rm", "dpo") and comp.source == "file":
            paths = cfg.data.path or (pipe.stage_config("rm").data.path if stage == "dpo" else [])
            need_paths(stage, paths, f"{key}.data.path", "the preference files (recipe.comparisons.source=file)")
        elif stage in ("ppo", "grpo"):
            need_paths(stage, cfg.data.path, f"{key}.data.path", "the RL prompt files")
            if "rm" not in plan and not (cfg.rl.reward_model or cfg.rl.reward_fn):
                raise ConfigError(f"stage {stage}: no reward: add rm to recipe.stages, or set "
                                  f"{key}.rl.reward_model (an RM directory) or {key}.rl.reward_fn")
            if "rm" in plan and cfg.rl.reward_fn:
                raise ConfigError(f"stage {stage}: {key}.rl.reward_fn is set but the recipe trains a reward "
                                  f"model (rm in recipe.stages); keep one of them")
            need_dir(stage, None if "rm" in plan else cfg.rl.reward_model, f"{key}.rl.reward_model")
        if stage != "pretrain" and not cfg.model.init and not upstream_model(stage, plan):
            first = "pretrain" if stage == "sft" else "sft"
            raise ConfigError(f"stage {stage}: no starting model: add {first} to recipe.stages or set "
                              f"{key}.model.init")
    if ("rm" in plan or "dpo" in plan) and comp.source != "file":
        if comp.source == "program" and not comp.ranker:
            raise ConfigError("stage rm: recipe.comparisons.source=program needs recipe.comparisons.ranker "
                              "(module:function of prompt, responses -> scores)")
        if comp.prompts:
            need_paths("rm", comp.prompts, "recipe.comparisons.prompts", "the prompts whose answers are ranked")
        elif not pipe.rl_stage(plan):
            raise ConfigError("stage rm: recipe.comparisons.prompts is empty and the recipe has no ppo/grpo "
                              "prompts to take them from")
        if comp.samples_per_prompt < 2:
            raise ConfigError("stage rm: recipe.comparisons.samples_per_prompt must be >= 2 (answers to rank)")
    for p in pipe.recipe.eval.prompts:
        if not Path(p).exists():
            raise ConfigError(f"stage eval: recipe.eval.prompts: no such file or folder '{p}'")


def upstream_model(stage: str, plan: list[str]) -> Optional[str]:
    """The run's own model this stage starts from: sft <- base, the later stages <- sft."""
    up = "pretrain" if stage == "sft" else "sft" if stage != "pretrain" else None
    return up if up in plan else None
