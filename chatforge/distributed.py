"""torchrun detection, process-group set-up, model wrapping and cross-rank reductions.

The same code runs as one plain process or under ``torchrun --nproc_per_node=N``: when
``WORLD_SIZE`` > 1 a process group is created with a timeout (``dist.timeout_s``), so that a
mismatched collective fails instead of hanging. :func:`barrier` -- where ranks wait for rank 0
to finish some I/O (training the tokenizer, tokenizing the corpus, writing a checkpoint) --
runs on a second, CPU (gloo) group with a longer timeout (``dist.wait_timeout_s``, at least
one hour), so that slow rank-0 work does not trip the training timeout.

Every helper here is a no-op (or the identity) in a single process. Every tensor collective of chatforge
goes through the helpers here, which run it on the process group's device (CUDA under NCCL, the CPU under
gloo) whatever device the caller's tensor is on (tests/test_collective_devices.py checks both).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Optional

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


MIN_WAIT_TIMEOUT_S = 3600.0  # floor of the barrier timeout: rank-0 I/O may take long

_wait_group = None  # the gloo group of barrier(), created by init()


def init(cfg: DistConfig, device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; return this process's rank info."""
    global _wait_group
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
            device_id=dev if dev.type == "cuda" and backend == "nccl" else None,
        )
        wait_s = getattr(cfg, "wait_timeout_s", None) or max(cfg.timeout_s, MIN_WAIT_TIMEOUT_S)
        _wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=wait_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def shutdown() -> None:
    global _wait_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _wait_group = None


def barrier() -> None:
    """Wait for every rank (e.g. for rank 0's I/O); on the long-timeout gloo group when there is one."""
    if dist.is_initialized():
        dist.barrier(group=_wait_group)


def group_device(group=None) -> Optional[torch.device]:
    """The device a tensor collective of ``group`` (default: the default group) needs its tensors on.

    NCCL: the current CUDA device (NCCL has no CPU tensors); gloo: the CPU; None for a group that
    takes both (``cpu:gloo,cuda:nccl``).
    """
    backend = str(dist.get_backend(group))
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return torch.device("cpu")
    return None


def _all_reduce(x: torch.Tensor, op) -> torch.Tensor:
    """``op`` over ranks on a copy of ``x`` moved to the group's device; the result on ``x``'s device."""
    if not dist.is_initialized():
        return x
    dev = group_device()
    y = x.to(dev if dev is not None else x.device, copy=True)
    dist.all_reduce(y, op=op)
    return y.to(x.device)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (returns the input unchanged in a single process).

    Safe on any device: the collective runs on the process group's device (e.g. a CPU counter is
    moved to the GPU under NCCL) and the sum comes back on ``x``'s device.
    """
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks, on any device (as :func:`all_reduce_sum`)."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def all_gather_objects(obj):
    """Gather one picklable object per rank into a list (rank order)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, info: DistInfo, strategy: str, mixed_bf16: bool = False) -> nn.Module:
    """Wrap a trainable model for data parallelism: DDP, or FSDP2 ``fully_shard`` per block.

    FSDP2: each transformer block (``model.model.layers[i]``) is one shard group and the root
    (embeddings, final norm, heads) another; with ``mixed_bf16`` the weights are gathered in
    bf16 and gradients reduced in fp32 (the master weights and optimizer stay fp32). The module
    is sharded in place, so a ``torch.compile`` wrapper given here keeps working on it.
    """
    if not info.enabled:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_bf16 else MixedPrecisionPolicy()
        raw = unwrap(model)
        trunk = getattr(raw, "model", raw)
        for block in getattr(trunk, "layers", []):
            fully_shard(block, mp_policy=mp)
        fully_shard(raw, mp_policy=mp)
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    # buffers (RoPE tables) are the same on every rank: no broadcast, so forward holds no collective
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def bare(model: nn.Module, cls: type) -> Optional[nn.Module]:
    """``model`` itself when it runs ``cls``'s own forward, wrapped by nothing (no DDP, compile or FSDP), else None:
    code that calls a native model's parts directly (its trunk, its head) asks this first."""
    if type(model).forward is cls.forward and not is_fsdp(model):
        return model
    return None


def is_fsdp(model: nn.Module) -> bool:
    """True for a module sharded by FSDP2 ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(unwrap(model), FSDPModule)


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """The plain module, with FSDP2 parameters gathered for the whole block (e.g. generation).

    Under FSDP2 every forward all-gathers the weights, a collective: ranks that decode a
    different number of steps (their rows stop at different lengths) would hang. Inside this
    context the weights are gathered once and stay gathered, so each rank may run as many
    forwards as it likes; they are resharded on exit. Costs one full copy of the model's
    weights per rank while it lasts. DDP / single process: just :func:`unwrap`.
    """
    raw = unwrap(model)
    if not is_fsdp(raw):
        yield raw
        return
    fsdp_mods = [m for m in raw.modules() if is_fsdp(m)]
    for m in fsdp_mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()  # all-gathers this module's weights (every rank enters this context together)
    try:
        yield raw
    finally:
        for m in fsdp_mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)


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
    """A full (unsharded) CPU state dict; collective under FSDP2, so every rank must call it.

    Under FSDP2 the shards are gathered one tensor at a time to rank 0's CPU memory, and the
    other ranks get an empty dict (only rank 0 writes model directories).
    """
    model = unwrap(model)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
