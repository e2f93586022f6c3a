"""What every stage does around its own algorithm: the set-up before training and the one finish after it.

    out, info = start(cfg, out)                       # --out checked, threads, seeds, process group
    ...build data, model, Trainer; result = trainer.fit(step_fn, eval_fn)...
    return finish(trainer, "model", cfg, tok, result, ...)   # model directory + chatforge.json, once

A stage file (stages/<name>.py) holds only what is particular to its algorithm; contributors change a
stage there, and the shared start/finish here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from chatforge import distributed as D
from chatforge.checkpoint import seed_all
from chatforge.config import Config, ResolvedRun
from chatforge.model.load import fresh_like
from chatforge.metrics import read_metrics
from chatforge.model.save import save_model_dir
from chatforge.rl.prompts import PromptSet
from chatforge.rl.roles import Roles
from chatforge.rundir import check_out_dir, flatten_metrics, write_run_info
from chatforge.tokenizer import ChatTokenizer
from chatforge.trainer import Trainer


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
                       extra={**(extra or {}), **more})
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
