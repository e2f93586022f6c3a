"""Run-directory I/O, in one place: ``chatforge.json`` (read, write, update), provenance, digests, ``--out`` checks.

A stage's ``--out`` is a Hugging Face model directory plus ``chatforge.json`` (stage, resolved config,
provenance, data fingerprints, final metrics), ``metrics.jsonl`` (chatforge.metrics) and ``checkpoint/``
(chatforge.checkpoint). Everything that reads or writes ``chatforge.json`` or fingerprints a file or a model
directory goes through this module; it imports nothing from chatforge but the config and atomic file writes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import chatforge
from chatforge.checkpoint import CHECKPOINT_DIR, atomic_write_json
from chatforge.config import Config, to_dict
from chatforge.errors import UserInputError

RUN_INFO = "chatforge.json"


class OutDirError(UserInputError):
    """``--out`` cannot be used for this run (one line: the directory and the reason)."""


def read_run_info(model_dir: str | Path) -> dict:
    """``<dir>/chatforge.json`` as a dict ({} when there is none)."""
    p = Path(model_dir) / RUN_INFO
    return json.loads(p.read_text()) if p.is_file() else {}


def update_run_info(model_dir: str | Path, **fields) -> dict:
    """Merge ``fields`` into ``<dir>/chatforge.json`` (atomic rewrite)."""
    info = read_run_info(model_dir)
    new = {**info, **json.loads(json.dumps(fields, default=str))}
    if new != info:  # unchanged files keep their mtime (a rerun that changes nothing writes nothing)
        atomic_write_json(Path(model_dir) / RUN_INFO, new)
    return new


def file_digest(path: str | Path, n: int = 16) -> str:
    """The first ``n`` hex digits of the sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


def model_digest(model_dir: str | Path) -> str:
    """Fingerprint of a model directory's weights (model.safetensors)."""
    return file_digest(Path(model_dir) / "model.safetensors")


def git_commit() -> str:
    here = Path(chatforge.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def provenance() -> dict[str, Any]:
    """Versions, commit, platform and time of this run."""
    try:  # the installed version, read from its metadata: importing transformers costs seconds
        from importlib.metadata import version

        tv = version("transformers")
    except Exception:
        tv = None
    return {
        "chatforge_version": chatforge.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "transformers_version": tv,
        "python_version": sys.version.split()[0],
        "platform": platform.platform(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_run_info(out: Path, cfg: Config, *, data: Optional[dict] = None, metrics: Optional[dict] = None,
                   extra: Optional[dict] = None, wall_s: Optional[float] = None, resolved: Any = None) -> dict:
    """Write ``<out>/chatforge.json``: stage, config (as given), what the run resolved from it (``resolved``:
    e.g. the starting model's shape; a dataclass or a dict), provenance, data fingerprints, final metrics."""
    res = dataclasses.asdict(resolved) if dataclasses.is_dataclass(resolved) else dict(resolved or {})
    info = {"stage": cfg.stage, "seed": cfg.train.seed, **provenance(), "config": to_dict(cfg),
            "resolved": json.loads(json.dumps(res, default=str)), "data": data or {}, "metrics": metrics or {}}
    if wall_s is not None:
        info["wall_s"] = round(wall_s, 2)
    info.update(extra or {})
    atomic_write_json(Path(out) / RUN_INFO, info)
    return info


def flatten_metrics(result: dict) -> dict:
    """Final metrics of Trainer.fit as one flat dict (train_* and eval_* prefixes)."""
    flat = {}
    for kind in ("train", "eval"):
        for k, v in (result.get(kind) or {}).items():
            if k in ("kind", "step") or not isinstance(v, (int, float)):
                continue
            flat[f"{kind}_{k}" if not k.startswith(kind) else k] = v
    flat["steps"] = (result.get("train") or {}).get("step", 0)
    return flat


def check_out_dir(out: str | Path) -> Path:
    """``--out`` as a folder (made if missing); OutDirError when it is a file."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------------------------------------- --out safety

INPUTS_FILE = "inputs.json"  # <out>/checkpoint/inputs.json: what the checkpoint's run was started with
STAGE_SECTION = {"sft": "sft", "rm": "rm", "dpo": "dpo", "ppo": "rl", "grpo": "rl"}
VOLATILE = {"rl": ("sample_every", "offload_frozen")}  # settings that do not change what is trained
RUN_FILES = (RUN_INFO, "metrics.jsonl", "model.safetensors", "adapter", "eval_samples.jsonl", CHECKPOINT_DIR)


def quick_digest(path: Path) -> str:
    """A cheap fingerprint of a file of any size: its size and the sha256 of its first and last MiB."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _files(paths) -> list[Path]:
    out = []
    for p in map(Path, paths or []):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.is_file())
        elif p.is_file():
            out.append(p)
    return out


def _weights_digest(model_dir: Optional[str]) -> Optional[list[str]]:
    if not model_dir or not Path(model_dir).is_dir():
        return None
    d = Path(model_dir)
    return [quick_digest(f) for f in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin"))]


def run_inputs(cfg: Config) -> dict:
    """What a run trains on: the stage, its seed, the config sections that shape the result (paths replaced by
    digests of what they hold) and the data files. A checkpoint resumes only a run with the same inputs."""
    d = to_dict(cfg)
    sections = ["model", "tokenizer", "data", "optim", "lora"] + ([STAGE_SECTION[cfg.stage]] if cfg.stage in STAGE_SECTION else [])
    config = {s: dict(d[s]) for s in sections}
    if cfg.model.init:  # the starting model's own shape wins: only these model settings still count
        config["model"] = {k: d["model"][k] for k in ("dropout", "trust_remote_code")}
    config["model"].pop("init", None)
    config["tokenizer"].pop("path", None)
    for key in ("path", "val_path"):
        config["data"].pop(key, None)
    for key in VOLATILE.get(STAGE_SECTION.get(cfg.stage, ""), ()):
        config[STAGE_SECTION[cfg.stage]].pop(key, None)
    inputs = {"stage": cfg.stage, "seed": cfg.train.seed, "config": config,
              "model.init": _weights_digest(cfg.model.init),
              "data files": [quick_digest(f) for f in _files(cfg.data.path)],
              "data.val_path files": [quick_digest(f) for f in _files(cfg.data.val_path)]}
    if cfg.tokenizer.path:
        inputs["tokenizer.path"] = [quick_digest(f) for f in _files([cfg.tokenizer.path])]
    if cfg.stage in ("ppo", "grpo"):
        inputs["rl.reward_model"] = _weights_digest(cfg.rl.reward_model)
    return json.loads(json.dumps(inputs, default=str))


def input_changes(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """The dotted names whose values differ between two run_inputs records."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += input_changes(a, b, "" if k == "config" else f"{name}.")
        elif a != b:
            out.append(name if isinstance(a, list) or isinstance(b, list) or a is None or b is None
                       else f"{name} {a!r} -> {b!r}")
    return out


def stage_of(out: Path) -> Optional[str]:
    """The stage whose run ``out`` holds (its chatforge.json, else its checkpoint's inputs), or None."""
    info = read_run_info(out) if (out / RUN_INFO).is_file() else {}
    if info.get("stage"):
        return info["stage"]
    rec = out / CHECKPOINT_DIR / INPUTS_FILE
    return json.loads(rec.read_text()).get("stage") if rec.is_file() else None


def clear_run(out: Path) -> None:
    """Remove what a stage run leaves in ``out`` (``--train.restart``): chatforge.json first, then the metrics,
    weights, samples and checkpoint. Other files are kept (the next save overwrites the model directory's own)."""
    for name in RUN_FILES:
        p = Path(out) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
