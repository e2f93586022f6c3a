"""What the report card reads from a run directory: which stage folders it holds (the pipeline's names or
hand-run stage directories), each stage's chatforge.json, the pipeline's steps, whether it is a demo run, and
the recipe evaluation's results; :class:`ReportError` when the folder is not a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from chatforge.errors import UserInputError

STAGE_DIRS = [("pretrain", "base"), ("sft", "sft"), ("rm", "rm"), ("ppo", "ppo"), ("dpo", "dpo"), ("grpo", "grpo")]
STAGE_ORDER = [s for s, _ in STAGE_DIRS]


class ReportError(UserInputError):
    """The folder is not something a report card can be built from."""


def stage_info(d: Path) -> dict:
    p = d / "chatforge.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def _stage_of(d: Path) -> Optional[str]:
    """The stage a folder holds (its chatforge.json's "stage", else its pipeline name), or None."""
    st = stage_info(d).get("stage")
    if st in STAGE_ORDER:
        return st
    by_dir = {dd: s for s, dd in STAGE_DIRS}
    if d.name in by_dir and ((d / "chatforge.json").is_file() or (d / "metrics.jsonl").is_file()):
        return by_dir[d.name]
    return None


def stage_folders(root: Path) -> list[tuple[str, Path]]:
    """(stage, folder) of every stage directory in ``root``: the pipeline's names first, in stage order, then
    other sub-folders holding a stage run (hand-run stage directories keep their names)."""
    found = [(s, root / d) for s, d in STAGE_DIRS if _stage_of(root / d)]
    known = {d for _, d in found}
    if root.is_dir():
        extra = [(_stage_of(d), d) for d in sorted(root.iterdir()) if d.is_dir() and d not in known]
        found += sorted([(s, d) for s, d in extra if s], key=lambda x: STAGE_ORDER.index(x[0]))
    return found


def stage_folder(root: Path, stage: str) -> Path:
    """The folder of ``stage`` (the pipeline's name when present, else the first hand-run folder of it)."""
    return next((d for s, d in stage_folders(root) if s == stage), root / dict(STAGE_DIRS)[stage])


def run_kind(root: str | Path) -> str:
    """'pipeline' (pipeline.json), 'stages' (a folder of stage directories), else a ReportError."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"run directory {root} does not exist")
    if (root / "pipeline.json").is_file():
        return "pipeline"
    if stage_folders(root):
        return "stages"
    raise ReportError(f"{root} is neither a pipeline run (no pipeline.json) nor a folder of stage directories "
                      f"(no sub-folder holds a stage's chatforge.json or metrics.jsonl); point at the run's root")


def is_demo(root: Path) -> bool:
    """A run of the built-in demo world (its gold judge measured it)."""
    p = root / "pipeline.json"
    try:
        recipe = json.loads(p.read_text()).get("recipe") if p.is_file() else None
    except json.JSONDecodeError:
        recipe = None
    if isinstance(recipe, dict) and "data" in recipe:
        return recipe["data"] == "demo"
    return (root / "data" / "world.json").is_file() or any("gold_score" in stage_info(d) for _, d in stage_folders(root))


def recipe_eval(root: Path) -> dict:
    p = root / "eval" / "results.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def pipeline_steps(root: Path) -> dict:
    p = root / "pipeline.json"
    try:
        return json.loads(p.read_text()).get("steps", {}) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}
