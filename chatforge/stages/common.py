"""What every stage does around its own work: set-up, the model directory, chatforge.json."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

import chatforge
from chatforge import distributed as D
from chatforge.checkpoint import atomic_write_json
from chatforge.config import Config, to_dict

RUN_INFO = "chatforge.json"


def setup(cfg: Config) -> D.DistInfo:
    """Threads, seeds and the process group of a stage run."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    info = D.init(cfg.dist, cfg.train.device)
    seed_everything(cfg.train.seed + info.rank)
    return info


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def git_commit() -> str:
    here = Path(chatforge.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def provenance() -> dict[str, Any]:
    try:
        import transformers

        tv = transformers.__version__
    except Exception:  # transformers is optional at run time
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
                   extra: Optional[dict] = None, wall_s: Optional[float] = None) -> dict:
    """Write ``<out>/chatforge.json``: stage, resolved config, provenance, data fingerprints, final metrics."""
    info = {
        "stage": cfg.stage,
        "seed": cfg.train.seed,
        **provenance(),
        "config": to_dict(cfg),
        "data": data or {},
        "metrics": metrics or {},
    }
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


def check_out_dir(out: Path) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    return out


def special_ids(tok) -> dict:
    """The ids a Hugging Face model directory records (see model/hf.save_model)."""
    return {"pad_id": tok.pad_id, "bos_id": tok.bos_id, "eos_id": tok.eot_id, "end_id": tok.end_id}


def save_model_dir(model, out: Path, model_cfg, tok, generation: Optional[dict] = None, *,
                   state: Optional[dict] = None) -> None:
    """Write a complete Hugging Face model directory: weights, config, generation config, tokenizer.

    ``model``: the trained model (a DDP/compile wrapper is stripped): native GPT / ScalarModel
    (model/hf.save_model) or a wrapped transformers model (save_pretrained). With LoRA adapters
    (model/lora.apply_lora) the adapters are merged into the weights when ``lora.merge`` (a plain HF
    directory); otherwise the base weights are written and the adapter goes to ``<out>/adapter/``
    (peft format; load_causal_lm merges it back on load). ``state``: a full state dict to write
    instead of ``model``'s own (FSDP: pass ``D.full_state_dict(net)``, gathered on every rank).
    """
    from chatforge.model import lora as L
    from chatforge.model.hf import save_model
    from chatforge.model.hf_causal import HFCausalLM, HFScalarModel, fresh_like, save_hf_model

    out = Path(out)
    model = D.unwrap(model)
    if state is not None:
        fresh = fresh_like(model)  # same class, shapes and LoRA layout
        fresh.load_state_dict(state)
        model = fresh
    adapter = None
    if L.has_lora(model):
        if model.lora_config.merge:
            model = L.merged_copy(model)
        else:
            adapter, model = model, L.base_copy(model)
    if isinstance(model, (HFCausalLM, HFScalarModel)):
        save_hf_model(model, out, special_ids(tok), generation)
    else:
        save_model(model, out, model_cfg, model.vocab_size, special_ids(tok), generation)
    tok.save(out, model_max_length=model_cfg.block_size)
    if adapter is not None:
        L.save_adapter(adapter, out / L.ADAPTER_DIR)
    elif (out / L.ADAPTER_DIR).is_dir():  # a stale adapter from an earlier unmerged save
        import shutil

        shutil.rmtree(out / L.ADAPTER_DIR)
