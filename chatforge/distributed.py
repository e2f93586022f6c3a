"""torchrun detection, process-group set-up, model wrapping and cross-rank reductions.

The same code runs as one plain process or under ``torchrun --nproc_per_node=N``: when
``WORLD_SIZE`` > 1 a process group is created with a timeout, so that a mismatched
collective fails instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from chatforge.config import DistConfig


@dataclass
class DistInfo:
    rank: int = 0
    """Global rank of this process."""
    world_size: int = 1
    """Number of processes."""
    local_rank: int = 0
    """Rank on this machine (selects the GPU)."""
    device: torch.device = torch.device("cpu")
    """Device of this process."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks cuda:<local_rank> when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def init(cfg: DistConfig, device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; return this process's rank info."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=cfg.timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns the input unchanged in a single process)."""
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_objects(obj):
    """Gather one picklable object per rank into a list (rank order)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def wrap(model: nn.Module, info: DistInfo, strategy: str, mixed_bf16: bool = False) -> nn.Module:
    """Wrap a trainable model for data parallelism: DDP, or FSDP2 ``fully_shard`` per block."""
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else MixedPrecisionPolicy()
        trunk = getattr(model, "model", model)
        for block in getattr(trunk, "layers", []):
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under a DDP or torch.compile wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A full (unsharded) CPU state dict; collective under FSDP2, so every rank must call it."""
    model = unwrap(model)
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        if hasattr(v, "full_tensor"):  # a DTensor shard of FSDP2
            v = v.full_tensor()
        out[k] = v.detach().to("cpu")
    return out
