"""Atomic files and resumable checkpoints.

A checkpoint is one file, ``<out>/checkpoint/state.pt``, holding everything a run needs to
continue exactly: model and optimizer states, the step, every rank's RNG states, the data
position and any stage state (e.g. a KL controller). It is written under a temporary name
and renamed, so a crash mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from chatforge.errors import ChatforgeError
from chatforge.files import set_umask_mode

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"


class CheckpointError(ChatforgeError, RuntimeError):
    """A checkpoint that cannot be read (truncated, or not chatforge's)."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place.

    The file gets the mode of a plain new file under the umask (not mkstemp's private 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        set_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        set_umask_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (every device): the one seed helper of every stage and test."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, NumPy, torch (CPU) and CUDA of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(out: Path) -> Path:
    return Path(out) / CHECKPOINT_DIR / STATE_FILE


def save_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    path = checkpoint_path(out)
    atomic_torch_save(path, state)
    return path


def load_checkpoint(out: Path) -> Optional[dict[str, Any]]:
    path = checkpoint_path(out)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e}); remove it to start over") from None


def world_change_note(ckpt: dict[str, Any], train_cfg: Any, world_size: int) -> Optional[str]:
    """What to tell when a checkpoint resumes under another world size or global batch (None: nothing changed).

    Pretraining's TokenLoader and the BucketBatcher draw whole global batches of
    batch_size x grad_accum x world_size examples and slice them by rank, so a resume whose
    global batch is unchanged (e.g. 2 ranks x accum 1 -> 1 rank x accum 2) continues the
    exact data order; another global batch continues with valid but different batches.
    """
    saved_w = int(ckpt.get("world_size", 1))
    saved_train = ckpt.get("config", {}).get("train", {})
    tc, W = train_cfg, world_size
    saved_g = saved_train.get("batch_size", tc.batch_size) * saved_train.get("grad_accum", tc.grad_accum) * saved_w
    now_g = tc.batch_size * tc.grad_accum * W
    if saved_w == W and saved_g == now_g:
        return None
    if saved_g == now_g:
        return (f"resume: checkpoint of {saved_w} processes resumed on {W}; the global batch "
                f"({now_g} = batch_size x grad_accum x processes) is unchanged, so the data order continues exactly")
    return (f"resume: warning: the global batch changed from {saved_g} to {now_g} "
            f"(batch_size x grad_accum x processes; {saved_w} -> {W} processes); training continues "
            f"but the batches differ from an uninterrupted run. Keep batch_size x grad_accum x processes "
            f"equal for an exact resume")
