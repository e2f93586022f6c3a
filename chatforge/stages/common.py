"""What every stage does around its own algorithm: the set-up before training and the one finish after it.

    @stage_entry                                      # the --out rules below, before anything is built
    def run(cfg, out): ...
    out, info = start(cfg, out)                       # --out made, threads, seeds, process group
    ...build data, model, Trainer; result = trainer.fit(step_fn, eval_fn)...
    return finish(trainer, "model", cfg, tok, result, ...)   # model directory + chatforge.json, once

``--out`` rules (:func:`stage_entry`): a folder holding another stage's run is refused; a checkpoint resumes
only a run with the same inputs (chatforge.rundir.run_inputs; else one line names what changed and
``--train.restart=true`` starts over); a finished run with the same inputs is left as it is; a run that fails
in a folder it created before its first checkpoint removes that folder.

A stage file (stages/<name>.py) holds only what is particular to its algorithm; contributors change a
stage there, and the shared start/finish here.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from chatforge import distributed as D
from chatforge.checkpoint import atomic_write_json, checkpoint_path, seed_all
from chatforge.config import Config, ResolvedRun
from chatforge.model.load import fresh_like
from chatforge.metrics import read_metrics
from chatforge.model.save import save_model_dir
from chatforge.rl.prompts import PromptSet
from chatforge.rl.roles import Roles
from chatforge.rundir import (CHECKPOINT_DIR, INPUTS_FILE, OutDirError, check_out_dir, clear_run, flatten_metrics,
                              input_changes, read_run_info, run_inputs, stage_of, write_run_info)
from chatforge.tokenizer import ChatTokenizer
from chatforge.trainer import Interrupted, Trainer

StageRun = Callable[[Config, "str | Path"], dict]


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"  # before the process group exists


def check_out(cfg: Config, out: Path) -> Optional[dict]:
    """The --out rules before a run builds anything; returns the recorded metrics when ``out`` already holds this
    run, finished (nothing to do), else None. Raises OutDirError (one line) for another stage's run or a run
    for other inputs."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} exists and is not a folder")
    if not out.is_dir():
        return None
    if cfg.train.restart:
        if _is_main():
            clear_run(out)
        return None
    held = stage_of(out)
    if held is not None and held != cfg.stage:
        raise OutDirError(f"--out {out} holds a {held} run; give {cfg.stage} another --out")
    now, info = run_inputs(cfg), read_run_info(out)
    rec = out / CHECKPOINT_DIR / INPUTS_FILE
    saved = json.loads(rec.read_text()) if rec.is_file() and checkpoint_path(out).is_file() else info.get("inputs")
    changes = input_changes(saved, now) if saved is not None else []
    if changes:
        raise OutDirError(f"--out {out} holds a {cfg.stage} run for other inputs (changed: {'; '.join(changes)}); "
                          f"start over there with --train.restart=true, or use another --out")
    if info.get("stage") == cfg.stage and info.get("metrics", {}).get("steps") == cfg.train.max_steps:
        return info["metrics"]
    return None


def stage_entry(run: StageRun) -> StageRun:
    """Wrap a stage's ``run(cfg, out)`` with the --out rules (see the module docstring)."""

    @functools.wraps(run)
    def entry(cfg: Config, out: str | Path) -> dict:
        out = Path(out)
        done = check_out(cfg, out)
        if done is not None:
            print(f"{cfg.stage}: {out} holds this run, finished ({cfg.train.max_steps} steps); nothing to do "
                  f"(--train.restart=true trains it again)")
            return done
        created = not out.exists()
        if _is_main() and not checkpoint_path(out).is_file():  # a fresh start: record what this run trains on
            atomic_write_json(out / CHECKPOINT_DIR / INPUTS_FILE, run_inputs(cfg))
        try:
            return run(cfg, out)
        except Interrupted:
            raise  # a checkpoint was saved: the same command resumes
        except BaseException:
            if created and _is_main() and not checkpoint_path(out).is_file():
                shutil.rmtree(out, ignore_errors=True)  # nothing a later run could take for a result
            raise

    return entry


def start(cfg: Config, out: str | Path) -> tuple[Path, D.DistInfo]:
    """``--out`` made (or checked), then threads, seeds and the process group of a stage run."""
    out = check_out_dir(out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    info = D.init(cfg.dist, cfg.train.device)
    seed_all(cfg.train.seed + info.rank)
    return out, info


def finish(trainer: Trainer, role: str, cfg: Config, tok: ChatTokenizer, result: dict, *, t_start: float,
           resolved: ResolvedRun, data: Optional[dict] = None, extra: Optional[dict] = None,
           metrics_extra: Optional[dict] = None, on_final: Optional[Callable[[torch.nn.Module], dict]] = None,
           shown: tuple[str, ...] = ("train_loss", "eval_val_loss")) -> dict:
    """The end of every stage: the trained ``role``'s full weights gathered (collective), and on rank 0 the
    Hugging Face model directory and ``chatforge.json`` written and one summary line printed; then a barrier.

    ``resolved``: what the run resolved from its inputs (its ``model`` is the saved model's shape);
    ``on_final(model) -> dict``: extra chatforge.json fields computed from the final model (rank 0, eval mode,
    before the save). Returns the flat final metrics (every rank).
    """
    net = trainer.models[role]
    state = D.full_state_dict(net)
    metrics = {**flatten_metrics(result), **(metrics_extra or {})}
    out = trainer.out
    if trainer.info.is_main:
        final = fresh_like(D.unwrap(net))  # an unsharded copy (same class, shapes, LoRA layout)
        final.load_state_dict(state)
        more = on_final(final.eval()) if on_final else {}
        save_model_dir(final, out, resolved.model, tok)
        write_run_info(out, cfg, metrics=metrics, wall_s=time.time() - t_start, data=data, resolved=resolved,
                       extra={**(extra or {}), **more, "inputs": run_inputs(cfg)})
        parts = [f"{k}={metrics[k]:.4g}" for k in shown if isinstance(metrics.get(k), (int, float))]
        print(f"{cfg.stage}: done in {time.time() - t_start:.0f}s; " + ", ".join(parts) + f"; model written to {out}")
    D.barrier()
    return metrics


def finish_rl(trainer: Trainer, cfg: Config, roles: Roles, prompts: PromptSet, result: dict, t_start: float,
              algo: str) -> dict:
    """The shared finish (stages/common.finish) with the first step's reward and KL next to the last."""
    rows = [x for x in read_metrics(trainer.out) if x.get("kind") == "train"] if trainer.info.is_main else []
    first = {f"first_{k}": rows[0][k] for k in ("reward", "reward_raw", "kl") if rows and k in rows[0]}
    return finish(trainer, "actor", cfg, roles.tok, result, t_start=t_start,
                  resolved=ResolvedRun(roles.model_cfg, algo), extra={"algo": algo} if algo != "ppo" else None,
                  data={**prompts.meta, "tokenizer_fingerprint": roles.tok.fingerprint()},
                  metrics_extra=first, shown=("first_reward", "train_reward", "train_kl", "train_eos_fraction"))
