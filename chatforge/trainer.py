"""The one training loop, shared by every stage.

A stage hands the :class:`Trainer` its trainable models and a *step function*; the trainer
owns everything around it: optimizers (AdamW, one per model), the warmup + cosine learning
rate, autocast, DDP/FSDP wrapping, gradient clipping, evaluation, logging to
``metrics.jsonl``, the progress bar, and atomic checkpoints with exact resume (also on
SIGINT/SIGTERM). A step function does one optimizer step's work::

    def step_fn(step: int) -> dict:
        for i, batch in enumerate(micro_batches):
            with trainer.micro(last=i == len(micro_batches) - 1):
                loss = ...
            trainer.backward(loss)
        stats = trainer.optimizer_step()
        return {"loss": ..., "tokens": ..., **stats}

PPO-style stages call ``optimizer_step`` several times inside one step (epochs x minibatches).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from chatforge import distributed as D
from chatforge.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from chatforge.config import Config, OptimConfig, to_dict
from chatforge.metrics import MetricsLog

StepFn = Callable[[int], dict]
EvalFn = Callable[[int], dict]

# Dense bf16 peak FLOP/s per GPU, for MFU. Unknown devices (CPUs) report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last checkpoint is kept."""


class Interrupted(RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was saved; the same command resumes."""


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_multiplier(step: int, oc: OptimConfig, max_steps: int) -> float:
    """Linear warmup to 1, then cosine decay to ``min_lr_ratio`` (or flat for 'constant')."""
    if step < oc.warmup_steps:
        return (step + 1) / oc.warmup_steps
    if oc.schedule == "constant":
        return 1.0
    decay = oc.decay_steps or max_steps
    if step >= decay:
        return oc.min_lr_ratio
    progress = (step - oc.warmup_steps) / max(1, decay - oc.warmup_steps)
    return oc.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - oc.min_lr_ratio)


def make_optimizer(model: nn.Module, lr: float, oc: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (not on norms, biases or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = oc.fused and device.type in ("cuda", "cpu")
    try:
        opt = torch.optim.AdamW(groups, lr=lr, betas=(oc.beta1, oc.beta2), eps=oc.eps, fused=fused)
    except (RuntimeError, TypeError):  # fused kernel unavailable for these tensors
        opt = torch.optim.AdamW(groups, lr=lr, betas=(oc.beta1, oc.beta2), eps=oc.eps)
    for g in opt.param_groups:
        g["base_lr"] = lr
    return opt


def autocast_dtype(dtype: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for train.dtype ('auto' = bf16 on CUDA with bf16 support, else fp32)."""
    if dtype == "bf16":
        return torch.bfloat16
    if dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def peak_flops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class Trainer:
    def __init__(
        self,
        cfg: Config,
        out: Path,
        models: dict[str, nn.Module],
        info: D.DistInfo,
        *,
        lrs: Optional[dict[str, float]] = None,
        state: Optional[dict[str, Any]] = None,
        flops_per_token: float = 0.0,
    ):
        """``models``: the trainable modules by role (already on ``info.device``); ``lrs``: per-role
        peak learning rates (default optim.lr); ``state``: extra objects with
        ``state_dict``/``load_state_dict`` saved in checkpoints (data loaders, KL controllers)."""
        self.cfg, self.out, self.info = cfg, Path(out), info
        self.raw = dict(models)
        self.amp_dtype = autocast_dtype(cfg.train.dtype, info.device)
        self.models: dict[str, nn.Module] = {}
        for name, m in self.raw.items():
            m.train()
            if cfg.train.compile:
                m = torch.compile(m)
            self.models[name] = D.wrap(m, info, cfg.dist.strategy, mixed_bf16=self.amp_dtype is not None)
        lrs = lrs or {}
        self.optimizers = {
            name: make_optimizer(self.models[name], lrs.get(name, cfg.optim.lr), cfg.optim, info.device) for name in self.models
        }
        self.state = state or {}
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(info.device)
        self.step = 0
        self.elapsed = 0.0
        self.log = MetricsLog(self.out, info.is_main, cfg)
        self._stop = False

    # ---- pieces a step function uses -------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.info.device.type, dtype=self.amp_dtype)

    @contextlib.contextmanager
    def micro(self, last: bool = True, names: Optional[list[str]] = None):
        """Context of one micro-batch forward: autocast, and DDP gradient sync only on the last one."""
        with contextlib.ExitStack() as stack:
            if not last:
                for name in names or list(self.models):
                    m = self.models[name]
                    if isinstance(m, nn.parallel.DistributedDataParallel):
                        stack.enter_context(m.no_sync())
                    elif hasattr(m, "set_requires_gradient_sync"):  # FSDP2
                        m.set_requires_gradient_sync(False)
            elif self.cfg.dist.strategy == "fsdp":
                for name in names or list(self.models):
                    m = self.models[name]
                    if hasattr(m, "set_requires_gradient_sync"):
                        m.set_requires_gradient_sync(True)
            stack.enter_context(self.autocast())
            yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_scale(self) -> float:
        """Multiply a loss normalised by a global count by this, since DDP/FSDP average gradients over ranks."""
        return float(self.info.world_size)

    def optimizer_step(self, names: Optional[list[str]] = None) -> dict[str, float]:
        """Clip, step and zero the named optimizers (all by default); returns their gradient norms."""
        stats = {}
        for name in names or list(self.optimizers):
            opt = self.optimizers[name]
            params = [p for g in opt.param_groups for p in g["params"]]
            if self.cfg.optim.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, float("inf"))
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            opt.step()
            opt.zero_grad(set_to_none=True)
            stats["grad_norm" if len(self.optimizers) == 1 else f"grad_norm_{name}"] = float(norm)
        return stats

    def set_lr(self, step: int) -> float:
        mult = lr_multiplier(step, self.cfg.optim, self.cfg.train.max_steps)
        for opt in self.optimizers.values():
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * mult
        return mult * self.cfg.optim.lr

    # ---- checkpoints -------------------------------------------------------------------

    def _model_and_optim_states(self) -> tuple[dict, dict]:
        """Full (unsharded) model and optimizer states keyed by parameter names, on the CPU.

        The same format for one process, DDP and FSDP2 (torch.distributed.checkpoint's
        state-dict API strips the DDP/compile wrappers and gathers FSDP2 shards), so a
        checkpoint resumes under any strategy and world size. Collective: every rank calls it.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        models, optims = {}, {}
        for name, m in self.models.items():
            models[name], optims[name] = get_state_dict(m, self.optimizers[name], options=opts)
        return models, optims

    def save_checkpoint(self) -> None:
        models, optims = self._model_and_optim_states()
        rngs = D.all_gather_objects(rng_state())
        if self.info.is_main:
            save_checkpoint(
                self.out,
                {
                    "step": self.step,
                    "elapsed": self.elapsed,
                    "models": models,
                    "optimizers": optims,
                    "rng": rngs,
                    "state": {k: v.state_dict() for k, v in self.state.items()},
                    "config": to_dict(self.cfg),
                    "world_size": self.info.world_size,
                },
            )
        D.barrier()

    def resume(self) -> bool:
        """Load ``<out>/checkpoint`` if there is one; metrics.jsonl is cut back to its step."""
        ckpt = load_checkpoint(self.out)
        if ckpt is None:
            if self.info.is_main:
                self.log.reset()
            D.barrier()
            return False
        saved_model = ckpt.get("config", {}).get("model", {})
        now = to_dict(self.cfg)["model"]
        shape_keys = ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "block_size")
        diff = [k for k in shape_keys if k in saved_model and saved_model[k] != now[k]]
        if diff:
            raise TrainingError(
                f"{self.out}/checkpoint was written by a model with other {', '.join(diff)}; "
                f"use another --out or delete the checkpoint folder to start over"
            )
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        for name, m in self.models.items():
            set_state_dict(m, self.optimizers[name], model_state_dict=ckpt["models"][name],
                           optim_state_dict=ckpt["optimizers"][name], options=opts)
        for k, v in self.state.items():
            if k in ckpt["state"]:
                v.load_state_dict(ckpt["state"][k])
        self.step, self.elapsed = ckpt["step"], ckpt.get("elapsed", 0.0)
        rngs = ckpt["rng"]
        if self.info.rank < len(rngs):
            set_rng_state(rngs[self.info.rank])
        else:  # a rank the saving run did not have: a fresh stream of its own, not a copy of rank 0's
            seed_all(self.cfg.train.seed + self.info.rank + 1_000_003 * self.step)
        self._check_world_change(ckpt)
        if self.info.is_main:
            self.log.truncate(self.step)
        D.barrier()
        return True

    def _check_world_change(self, ckpt: dict) -> None:
        """Tell (rank 0) when a checkpoint resumes under another world size or global batch.

        Pretraining's TokenLoader and the BucketBatcher draw whole global batches of
        batch_size x grad_accum x world_size examples and slice them by rank, so a resume whose
        global batch is unchanged (e.g. 2 ranks x accum 1 -> 1 rank x accum 2) continues the
        exact data order; another global batch continues with valid but different batches.
        """
        saved_w = int(ckpt.get("world_size", 1))
        saved_train = ckpt.get("config", {}).get("train", {})
        tc, W = self.cfg.train, self.info.world_size
        saved_g = saved_train.get("batch_size", tc.batch_size) * saved_train.get("grad_accum", tc.grad_accum) * saved_w
        now_g = tc.batch_size * tc.grad_accum * W
        if not self.info.is_main or (saved_w == W and saved_g == now_g):
            return
        if saved_g == now_g:
            print(f"resume: checkpoint of {saved_w} processes resumed on {W}; the global batch "
                  f"({now_g} = batch_size x grad_accum x processes) is unchanged, so the data order continues exactly")
        else:
            print(f"resume: warning: the global batch changed from {saved_g} to {now_g} "
                  f"(batch_size x grad_accum x processes; {saved_w} -> {W} processes); training continues "
                  f"but the batches differ from an uninterrupted run. Keep batch_size x grad_accum x processes "
                  f"equal for an exact resume")

    # ---- the loop ------------------------------------------------------------------------

    def _on_signal(self, signum, frame):
        self._stop = True

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self._stop else 0.0])
        return bool(D.all_reduce_max(flag).item() > 0) if self.info.enabled else self._stop

    def _evaluate(self, eval_fn: Optional[EvalFn]) -> dict:
        if eval_fn is None:
            return {}
        for m in self.models.values():
            m.eval()
        t0 = time.time()
        with torch.no_grad():
            res = eval_fn(self.step)
        for m in self.models.values():
            m.train()
        res = dict(res)
        self.log.write({"kind": "eval", "step": self.step, "elapsed_s": round(self.elapsed, 3),
                        "eval_s": round(time.time() - t0, 3), **res})
        return res

    def fit(self, step_fn: StepFn, eval_fn: Optional[EvalFn] = None, *, desc: str = "train",
            show: tuple[str, ...] = ()) -> dict:
        """Run (or resume) the loop to train.max_steps; returns the last train and eval metrics.

        ``show``: extra keys of the step metrics to display on the progress bar (e.g. reward, kl)."""
        tc = self.cfg.train
        resumed = self.resume()
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            try:
                signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread
                pass
        last_train: dict = {}
        last_eval: dict = {}
        bar = None
        if tc.progress and self.info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=self.step, desc=desc, dynamic_ncols=True, leave=True)
        try:
            if not resumed and self.step == 0 and tc.eval_every > 0:
                last_eval = self._evaluate(eval_fn)
            window_t, window_tokens = time.time(), 0.0
            while self.step < tc.max_steps:
                t0 = time.time()
                lr = self.set_lr(self.step)
                metrics = step_fn(self.step)
                loss = float(metrics.get("loss", 0.0))
                if not math.isfinite(loss):
                    raise TrainingError(
                        f"step {self.step + 1}: the loss is {loss}; the run stops and the last checkpoint is kept. "
                        f"Try a lower --optim.lr or --train.dtype=fp32"
                    )
                dt = time.time() - t0
                self.elapsed += dt
                self.step += 1
                tokens = float(metrics.get("tokens", 0.0))
                window_tokens += tokens
                row = {"kind": "train", "step": self.step, "lr": lr, **metrics,
                       "step_s": round(dt, 4), "elapsed_s": round(self.elapsed, 3)}
                if tokens:
                    row["tokens_per_s"] = tokens / max(dt, 1e-9)
                    if self.flops_per_token and self.peak:
                        row["mfu"] = self.flops_per_token * row["tokens_per_s"] / (self.peak * self.info.world_size)
                last_train = row
                if self.step % tc.log_every == 0 or self.step == tc.max_steps:
                    self.log.write(row)
                if bar is not None:
                    bar.update(1)
                    post = {"loss": f"{loss:.4f}"}
                    post.update({k: f"{metrics[k]:.4g}" for k in show if isinstance(metrics.get(k), (int, float))})
                    span = time.time() - window_t
                    if window_tokens and span > 0:
                        post["tok/s"] = f"{window_tokens / span:,.0f}"
                    if "mfu" in row:
                        post["mfu"] = f"{100 * row['mfu']:.1f}%"
                    bar.set_postfix(post, refresh=False)
                    window_t, window_tokens = time.time(), 0.0
                done = self.step == tc.max_steps
                if (tc.eval_every > 0 and self.step % tc.eval_every == 0) or done:
                    last_eval = self._evaluate(eval_fn)
                if (tc.ckpt_every > 0 and self.step % tc.ckpt_every == 0) or done:
                    self.save_checkpoint()
                if not done and self._should_stop():
                    self.save_checkpoint()
                    raise Interrupted(f"interrupted at step {self.step}; checkpoint saved in {self.out}/checkpoint; "
                                      f"run the same command to resume")
            if resumed and not last_eval:
                last_eval = self._evaluate(eval_fn)
        finally:
            self.log.close()
            if bar is not None:
                bar.close()
            for s, h in old.items():
                try:
                    signal.signal(s, h)
                except ValueError:
                    pass
        return {"train": last_train, "eval": last_eval}
