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
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import chatforge
from chatforge.checkpoint import atomic_write_json
from chatforge.config import Config, to_dict

RUN_INFO = "chatforge.json"


class OutDirError(ValueError):
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
    try:
        import transformers  # optional at run time

        tv = transformers.__version__
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
