"""The one training loop, shared by every stage.

A stage hands the :class:`Trainer` its trainable models and a *step function*; the trainer
owns everything around it: optimizers (AdamW, one per model), the warmup + cosine learning
rate, autocast, DDP/FSDP wrapping, the global normalisation of the loss, gradient clipping,
evaluation, logging to ``metrics.jsonl``, the progress bar, and atomic checkpoints with exact
resume (also on SIGINT/SIGTERM). A step function does one optimizer step's work::

    def micro_step(batch) -> tuple[Tensor, count, dict]:
        loss_sum = ...                     # the loss SUMMED over this micro-batch's tokens / pairs / sequences
        return loss_sum, n_units, {"correct": ...}   # statistics summed the same way

    def step_fn(step: int) -> dict:
        res = trainer.accumulate(loader.next(), micro_step)   # backward per micro-batch, one optimizer step
        return {"loss": res["loss"], ...}

:meth:`Trainer.accumulate` adds every rank's counts and sums in one all-reduce per optimizer step and
divides the gradients by the global count (as torchtitan does with its global valid-token count), so
micro-batching, accumulation and data parallelism give the gradient of one big batch; no stage scales
its loss by hand. PPO-style stages call ``accumulate`` several times inside one step (epochs x minibatches).
Contributors: the loop's cadence and resume live here; what a stage computes lives in chatforge/stages/.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from chatforge import distributed as D
from chatforge.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from chatforge.config import Config, to_dict
from chatforge.errors import ChatforgeError
from chatforge.checkpoint import (seed_all, world_change_note)
from chatforge.config import ModelConfig
from chatforge.metrics import MetricsLog
from chatforge.optim import lr_multiplier, make_optimizer

StepFn = Callable[[int], dict]
MicroStep = Callable[[Any], tuple[torch.Tensor, Any, dict]]
EvalFn = Callable[[int], dict]

# Dense bf16 peak FLOP/s per GPU, for MFU. Unknown devices (CPUs) report no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}


class TrainingError(ChatforgeError, RuntimeError):
    """Training cannot go on (e.g. a NaN loss); the last checkpoint is kept."""


class Interrupted(ChatforgeError, RuntimeError):
    """SIGINT/SIGTERM: a checkpoint was saved; the same command resumes."""

    exit_code = 130  # as a shell reports a process ended by SIGINT


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
        model_cfg: Optional[ModelConfig] = None,
        weight_decay: Optional[float] = None,
    ):
        """``models``: the trainable modules by role (already on ``info.device``); ``lrs``: per-role
        peak learning rates (default optim.lr); ``state``: extra objects with
        ``state_dict``/``load_state_dict`` saved in checkpoints (data loaders, KL controllers); ``model_cfg``: the
        trained model's shape when it is not cfg.model's (a starting model's own), checked on resume;
        ``weight_decay``: AdamW's decay of every model here instead of optim.weight_decay (rl.weight_decay)."""
        self.cfg, self.out, self.info = cfg, Path(out), info
        self.model_cfg = model_cfg or cfg.model
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
            name: make_optimizer(self.models[name], lrs.get(name, cfg.optim.lr), cfg.optim, info.device,
                                 weight_decay) for name in self.models
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
    def micro(self, last: bool = True):
        """Context of one micro-batch forward: autocast, and DDP gradient sync only on the last one."""
        with contextlib.ExitStack() as stack:
            for m in self.models.values():
                if not last and isinstance(m, nn.parallel.DistributedDataParallel):
                    stack.enter_context(m.no_sync())
                elif hasattr(m, "set_requires_gradient_sync") and (not last or self.cfg.dist.strategy == "fsdp"):
                    m.set_requires_gradient_sync(last)  # FSDP2
            stack.enter_context(self.autocast())
            yield

    def accumulate(self, micro_batches: Sequence, micro_step: MicroStep) -> dict[str, float]:
        """One optimizer step over this rank's ``micro_batches``: forward and backward each, then the step.

        ``micro_step(batch)`` runs under :meth:`micro` and returns ``(loss_sum, count, sums)``: the loss summed
        over the micro-batch's units (tokens, pairs or sequences), their number, and statistics summed the same
        way. The counts and sums of every rank are added in ONE all-reduce; the gradients are divided by the
        global count (times the world size: DDP/FSDP average gradients over ranks), then clipped and stepped.
        Returns ``{"loss": global loss sum / global count, "count": global count, **global sums, **grad norms}``.
        """
        sums: dict[str, Any] = defaultdict(float)  # float64 device tensors or numbers: no sync per micro-batch
        n = len(micro_batches)
        for i, batch in enumerate(micro_batches):
            with self.micro(last=i == n - 1):
                loss_sum, c, stats = micro_step(batch)
            loss_sum.backward()
            for k, v in (("_loss", loss_sum), ("_count", c), *stats.items()):
                sums[k] = sums[k] + (v.detach().double() if torch.is_tensor(v) else float(v))
        keys = ["_loss", "_count"] + sorted(k for k in sums if not k.startswith("_"))
        local = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64, device=self.info.device) for k in keys])
        totals = D.all_reduce_sum(local).tolist()  # one all-reduce and one transfer per optimizer step
        keys = keys[2:]
        global_count = max(totals[1], 1.0)
        self._scale_grads(self.info.world_size / global_count)
        return {"loss": totals[0] / global_count, "count": totals[1], **dict(zip(keys, totals[2:])),
                **self.optimizer_step()}

    def _scale_grads(self, factor: float) -> None:
        grads = [p.grad for m in self.models.values() for p in m.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)  # one fused launch instead of one per parameter

    def optimizer_step(self) -> dict[str, float]:
        """Clip, step and zero every optimizer; returns their gradient norms (before clipping)."""
        stats = {}
        for name, opt in self.optimizers.items():
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
                    "model_config": to_dict(self.model_cfg),
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
        saved_model = ckpt.get("model_config") or ckpt.get("config", {}).get("model", {})
        now = to_dict(self.model_cfg)
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
        if self.info.is_main:
            print(f"{self.cfg.stage}: resuming from step {self.step} ({self.out}/checkpoint)")
        rngs = ckpt["rng"]
        if self.info.rank < len(rngs):
            set_rng_state(rngs[self.info.rank])
        else:  # a rank the saving run did not have: a fresh stream of its own, not a copy of rank 0's
            seed_all(self.cfg.train.seed + self.info.rank + 1_000_003 * self.step)
        note = world_change_note(ckpt, self.cfg.train, self.info.world_size)
        if note and self.info.is_main:
            print(note)
        if self.info.is_main:
            self.log.truncate(self.step)
        D.barrier()
        return True

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

    @contextlib.contextmanager
    def _catch_signals(self):
        """SIGINT/SIGTERM set a flag (checked after each step) instead of killing the run; restored after."""
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            try:
                signal.signal(s, self._on_signal)
            except ValueError:  # not the main thread
                pass
        try:
            yield
        finally:
            for s, h in old.items():
                try:
                    signal.signal(s, h)
                except ValueError:
                    pass

    def _train_step(self, step_fn: StepFn) -> dict:
        """One step: learning rate, the stage's step function, the finiteness check; returns the metrics row."""
        t0 = time.time()
        lr = self.set_lr(self.step)
        metrics = step_fn(self.step)
        loss = float(metrics.get("loss", 0.0))
        if not math.isfinite(loss):
            raise TrainingError(f"step {self.step + 1}: the loss is {loss}; the run stops and the last checkpoint is "
                                f"kept. Try a lower --optim.lr or --train.dtype=fp32")
        dt = time.time() - t0
        self.elapsed += dt
        self.step += 1
        row = {"kind": "train", "step": self.step, "lr": lr, **metrics, "step_s": round(dt, 4),
               "elapsed_s": round(self.elapsed, 3)}
        tokens = float(metrics.get("tokens", 0.0))
        if tokens:
            row["tokens_per_s"] = tokens / max(dt, 1e-9)
            if self.flops_per_token and self.peak:
                row["mfu"] = self.flops_per_token * row["tokens_per_s"] / (self.peak * self.info.world_size)
        return row

    @staticmethod
    def _show(bar, row: dict, show: tuple[str, ...], since: float) -> None:
        """The progress bar's step, loss, ``show`` keys, tokens/s since ``since`` and MFU."""
        bar.update(1)
        post = {"loss": f"{float(row.get('loss', 0.0)):.4f}"}
        post.update({k: f"{row[k]:.4g}" for k in show if isinstance(row.get(k), (int, float))})
        span, tokens = time.time() - since, float(row.get("tokens", 0.0))
        if tokens and span > 0:
            post["tok/s"] = f"{tokens / span:,.0f}"
        if "mfu" in row:
            post["mfu"] = f"{100 * row['mfu']:.1f}%"
        bar.set_postfix(post, refresh=False)

    def fit(self, step_fn: StepFn, eval_fn: Optional[EvalFn] = None, *, desc: str = "train",
            show: tuple[str, ...] = ()) -> dict:
        """Run (or resume) the loop to train.max_steps; returns the last train and eval metrics.

        ``show``: extra keys of the step metrics to display on the progress bar (e.g. reward, kl)."""
        tc = self.cfg.train
        resumed = self.resume()
        last_train: dict = {}
        last_eval: dict = {}
        bar = None
        if tc.progress and self.info.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.max_steps, initial=self.step, desc=desc, dynamic_ncols=True, leave=True)
        try:
            with self._catch_signals():
                if not resumed and self.step == 0 and tc.eval_every > 0:
                    last_eval = self._evaluate(eval_fn)
                shown_t = time.time()
                while self.step < tc.max_steps:
                    last_train = self._train_step(step_fn)
                    done = self.step == tc.max_steps
                    if self.step % tc.log_every == 0 or done:
                        self.log.write(last_train)
                    if bar is not None:
                        self._show(bar, last_train, show, shown_t)
                        shown_t = time.time()
                    if (tc.eval_every > 0 and self.step % tc.eval_every == 0) or done:
                        last_eval = self._evaluate(eval_fn)
                    if (tc.ckpt_every > 0 and self.step % tc.ckpt_every == 0) or done:
                        self.save_checkpoint()
                    if not done and self._should_stop():
                        self.save_checkpoint()
                        raise Interrupted(f"interrupted at step {self.step}; checkpoint saved in {self.out}/"
                                          f"checkpoint; run the same command to resume")
                if resumed and not last_eval:
                    last_eval = self._evaluate(eval_fn)
        finally:
            self.log.close()
            if bar is not None:
                bar.close()
        return {"train": last_train, "eval": last_eval}
