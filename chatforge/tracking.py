"""Experiment trackers: TensorBoard, Weights & Biases and Trackio, fed from the metrics log.

``metrics.jsonl`` stays the source of truth; a tracker is a second copy of the same rows
(``--train.trackers=tensorboard,wandb,trackio``). :class:`chatforge.metrics.MetricsLog` hands every row
it writes to :class:`Trackers` on rank 0, so every stage and every kind of row is covered:

    row {"kind": K, "step": S, "loss": 2.31, ...}  ->  scalar "K/loss" = 2.31 at step S
                                                         (every number of the row but "step")
    row {"kind": "samples", "step": S, "samples": [{prompt, response, reward_raw, ...}, ...]}
                                                     ->  a table "samples" at step S (W&B, Trackio),
                                                         a markdown table as text (TensorBoard)
    the resolved config                              ->  the run's hyper-parameters

Where each tracker writes:

    tensorboard   <out>/tensorboard/events.out.tfevents.*   (``tensorboard --logdir RUN_DIR``)
    wandb         <out>/wandb/  offline unless the user configured W&B (WANDB_MODE, WANDB_API_KEY or
                  ``wandb login``); ``wandb sync <out>/wandb/offline-run-*`` uploads an offline run later.
                  Project $WANDB_PROJECT or "chatforge"; the run is named after the stage folder and
                  grouped by the run directory; a resumed stage continues the same W&B run.
    trackio       Trackio's local store (``trackio show``); project $TRACKIO_PROJECT or "chatforge"

:func:`export_tensorboard` writes the same event files afterwards from ``metrics.jsonl`` (``chatforge
export``), for runs made without a tracker.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional

from chatforge.config import ConfigError

TRACKERS = ("tensorboard", "wandb", "trackio")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"  # in <out>/wandb/: a resumed stage continues the same W&B run
NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}  # how metrics.jsonl stores them


def check_trackers(names: Iterable[str]) -> list[str]:
    """Validate tracker names and that their packages import; a one-line ConfigError otherwise."""
    names = [n.strip().lower() for n in names if n and n.strip()]
    for n in names:
        if n not in TRACKERS:
            raise ConfigError(f"bad value in 'train.trackers': {n!r}; choose from {', '.join(TRACKERS)}")
        if importlib.util.find_spec(PACKAGES[n]) is None:
            raise ConfigError(f"train.trackers: '{n}' needs the {PACKAGES[n]} package, which is not installed: "
                              f"pip install 'chatforge[track]' (or pip install {PACKAGES[n]})")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------------------ row mapping


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v in NON_FINITE:
        return NON_FINITE[v]
    return None


def scalars(row: dict) -> dict[str, float]:
    """The scalars a row gives a tracker: ``{"<kind>/<key>": value}`` for every number but the step."""
    kind = row.get("kind", "train")
    out = {}
    for k, v in row.items():
        if k in ("kind", "step"):
            continue
        x = _number(v)
        if x is not None:
            out[f"{kind}/{k}"] = x
    return out


def table(row: dict) -> Optional[tuple[list[str], list[list[Any]]]]:
    """(columns, rows) of a samples row (``{"kind": "samples", "samples": [dict, ...]}``), else None."""
    samples = row.get("samples")
    if not isinstance(samples, list) or not samples or not all(isinstance(s, dict) for s in samples):
        return None
    cols = list(dict.fromkeys(k for s in samples for k in s))
    return cols, [[s.get(c) for c in cols] for s in samples]


def flat_config(config: Optional[dict], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"train.max_steps": 30, ...}`` with values a hyper-parameter panel shows."""
    out: dict[str, Any] = {}
    for k, v in (config or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{key}."))
        elif isinstance(v, (bool, int, float, str)):
            out[key] = v
        else:
            out[key] = json.dumps(v)  # lists, None
    return out


def _markdown_table(cols: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- trackers


class TensorBoardTracker:
    """torch.utils.tensorboard's SummaryWriter in ``<out>/tensorboard`` (``log_dir`` to override)."""

    def __init__(self, out: Path, config: Optional[dict], resume_step: Optional[int] = None,
                 same_run: Optional[bool] = None, log_dir: Optional[Path] = None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.log_dir = Path(log_dir) if log_dir is not None else Path(out) / TENSORBOARD_DIR
        # purge_step: a resumed run hides the events its checkpoint did not keep (as metrics.jsonl is cut)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if resume_step is None else resume_step + 1)
        if config and not same_run:
            flat = flat_config(config)
            for summary in hparams(flat, {}):  # the run's own hparams, not a sub-run as add_hparams makes
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def log(self, row: dict) -> None:
        step = int(row.get("step", 0))
        for tag, v in scalars(row).items():
            self.writer.add_scalar(tag, v, step)
        t = table(row)
        if t is not None:
            self.writer.add_text(row.get("kind", "samples"), _markdown_table(*t), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _wandb_configured() -> bool:
    """Has the user set W&B up (WANDB_MODE, an API key in the environment, or ``wandb login``'s netrc)?"""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbTracker:
    """A W&B run in ``<out>/wandb``, offline unless the user configured W&B."""

    def __init__(self, out: Path, config: Optional[dict], resume_step: Optional[int] = None,
                 same_run: Optional[bool] = None):
        import wandb

        out = Path(out).resolve()
        (out / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb" / WANDB_ID_FILE
        again = resume_step is not None or bool(same_run)
        run_id = id_file.read_text().strip() if again and id_file.is_file() else None
        run_id = run_id or uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        kwargs: dict[str, Any] = {}
        if not _wandb_configured():
            kwargs["mode"] = "offline"
        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "chatforge"), name=out.name,
                              group=out.parent.name, dir=str(out), config=config or {}, id=run_id,
                              resume="allow", reinit="create_new", **kwargs)

    def log(self, row: dict) -> None:
        step = int(row.get("step", 0))
        data: dict[str, Any] = dict(scalars(row))
        t = table(row)
        if t is not None:
            data[row.get("kind", "samples")] = self.wandb.Table(columns=t[0], data=t[1])
        if data:
            self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """A Trackio run (W&B-like API, local store)."""

    def __init__(self, out: Path, config: Optional[dict], resume_step: Optional[int] = None,
                 same_run: Optional[bool] = None):
        import trackio

        out = Path(out).resolve()
        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "chatforge"),
                                name=f"{out.parent.name}/{out.name}", config=config or {},
                                resume="allow" if resume_step is not None or same_run else "never")

    def log(self, row: dict) -> None:
        step = int(row.get("step", 0))
        data: dict[str, Any] = dict(scalars(row))
        t = table(row)
        if t is not None and hasattr(self.trackio, "Table"):
            data[row.get("kind", "samples")] = self.trackio.Table(columns=t[0], data=t[1])
        if data:
            self.trackio.log(data, step=step)

    def close(self) -> None:
        self.trackio.finish()


TRACKER_CLASSES = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker}


class Trackers:
    """The trackers of one stage output directory, opened at their first row (after a resume is known)."""

    def __init__(self, names: Iterable[str], out: Path, config: Optional[dict] = None):
        self.names = check_trackers(names)
        self.out, self.config = Path(out), config
        self.resume_step: Optional[int] = None
        self.reopen = False
        self.open: Optional[list] = None

    def resumed_at(self, step: Optional[int]) -> None:
        """The run resumes a checkpoint of ``step`` (None: a fresh run)."""
        self.resume_step = step

    def log(self, row: dict) -> None:
        if not self.names:
            return
        if self.open is None:
            self.open = [TRACKER_CLASSES[n](self.out, self.config, self.resume_step, self.reopen or None)
                         for n in self.names]
        for t in self.open:
            t.log(row)

    def close(self) -> None:
        for t in self.open or []:
            t.close()
        if self.open is not None:
            self.reopen = True  # a row after close continues the same runs
        self.open = None
