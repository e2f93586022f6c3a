"""What the pipeline's steps share: the stage directories, the step record, fingerprints of a step's inputs,
and the signal that a recipe waits for people's rankings. The pipeline (chatforge/pipeline.py) and its step
modules (demo_steps, comparisons, recipe_eval) import it; it imports none of them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.rundir import file_digest, model_digest

DIRS = {"pretrain": "base", "sft": "sft", "rm": "rm", "ppo": "ppo", "dpo": "dpo", "grpo": "grpo"}
PIPELINE_FILE = "pipeline.json"
EXIT_WAITING = 3  # `chatforge pipeline` stopped to wait for people's rankings


class WaitingForLabels(Exception):
    """The recipe needs more ranked prompts in <run>/labels/labels.jsonl; the message says what to do."""


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def path_digest(path: str | Path) -> str:
    """A model directory's or data file's fingerprint: its weights/bytes, or (sharded or other weights) the
    names, sizes and modification times of its files."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return model_digest(p)
    if p.is_file():
        return file_digest(p)
    files = sorted(f for f in p.rglob("*") if f.is_file() and "checkpoint" not in f.parts)
    return digest([[str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def data_digest(paths: list[str]) -> str:
    from chatforge.data.records import fingerprint

    return fingerprint(paths)[:16]


@dataclass
class StepResult:
    status: str  # "ran", "resumed", "skipped", "waiting"
    wall_s: float = 0.0
    detail: dict = field(default_factory=dict)
