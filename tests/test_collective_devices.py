"""Collectives receive tensors on the process group's device, whatever device the caller's tensor is on.

NCCL takes CUDA tensors only; a CPU counter handed to ``all_reduce`` under NCCL crashes a multi-GPU run. On a
CPU machine the same mistake is caught the other way round: a one-process gloo group (CPU tensors only)
and caller tensors on a *fake CUDA device* (:class:`FakeCuda`, CPU data that reports ``cuda:0``), with
``torch.distributed``'s tensor collectives wrapped to fail on any tensor that is not on the group's device.
A second check keeps every tensor collective inside chatforge/distributed.py, where the helpers move
tensors to the group's device, so no call site can bypass them.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from chatforge import distributed as D
from tests.conftest import ROOT

pytestmark = pytest.mark.timeout(60)

FAKE = torch.device("cuda", 0)
TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                      "broadcast", "reduce", "gather", "scatter", "all_to_all_single")


def _is_fake(d) -> bool:
    return d is not None and torch.device(d).type == "cuda"


def _cpu_device(a):
    return torch.device("cpu") if isinstance(a, (str, torch.device)) and _is_fake(a) else a


class FakeCuda(torch.Tensor):
    """A tensor that reports device cuda:0 and keeps its data on the CPU (``.inner``)."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype, device=FAKE,
                                                requires_grad=inner.requires_grad)
        r.inner = inner
        return r

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        to_cpu = func is torch.ops.aten._to_copy.default and "device" in kwargs and not _is_fake(kwargs["device"])
        kwargs = {k: _cpu_device(v) for k, v in kwargs.items()}
        out = func(*tree_map(lambda a: a.inner if isinstance(a, FakeCuda) else a, args), **kwargs)
        if to_cpu:
            return out  # .to("cpu"): a real CPU tensor
        return tree_map(lambda a: FakeCuda(a) if isinstance(a, torch.Tensor) and not isinstance(a, FakeCuda) else a, out)


class FakeCudaMode(TorchFunctionMode):
    """Calls that name the fake device (``t.to("cuda")``, ``torch.tensor(..., device="cuda:0")``) run on the
    CPU and return FakeCuda tensors; ``.tolist()`` reads a FakeCuda tensor's data."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.tolist and isinstance(args[0], FakeCuda):
            return args[0].inner.tolist()  # as a CUDA tensor's .tolist() copies to the host
        named = any(isinstance(a, (str, torch.device)) and _is_fake(a) for a in (*args, *kwargs.values()))
        if not named:
            return func(*args, **kwargs)
        out = func(*[_cpu_device(a) for a in args], **{k: _cpu_device(v) for k, v in kwargs.items()})
        return FakeCuda(out) if isinstance(out, torch.Tensor) and not isinstance(out, FakeCuda) else out


@pytest.fixture
def gloo_group(tmp_path, monkeypatch):
    """A one-process gloo group whose tensor collectives fail on a tensor off the group's device (the CPU)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    seen = []

    def checked(name):
        real = getattr(dist, name)

        def collective(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, (list, tuple)) else [tensor]
            for t in tensors:
                assert type(t) is torch.Tensor and t.device == torch.device("cpu"), \
                    f"dist.{name} got a tensor on {t.device}; the gloo group's device is the CPU"
            seen.append(name)
            return real(tensor, *args, **kwargs)

        return collective

    for name in TENSOR_COLLECTIVES:
        monkeypatch.setattr(dist, name, checked(name))
    try:
        with FakeCudaMode():
            yield seen
    finally:
        dist.destroy_process_group()


def test_fake_cuda_harness_detects_a_wrong_device(gloo_group):
    """The check itself: a tensor on the (fake) CUDA device handed straight to a gloo collective fails."""
    x = torch.arange(3.0).to("cuda")
    assert isinstance(x, FakeCuda) and x.device == FAKE
    with pytest.raises(AssertionError, match="dist.all_reduce got a tensor on cuda:0"):
        dist.all_reduce(x)


@pytest.mark.parametrize("reduce", [D.all_reduce_sum, D.all_reduce_max])
def test_reductions_run_on_the_group_device_and_return_on_the_callers(gloo_group, reduce):
    x = torch.tensor([1.0, -2.0, 5.0], device="cuda")  # a counter on the training device
    y = reduce(x)
    assert gloo_group == ["all_reduce"]
    assert y.device == FAKE  # back on the caller's device
    assert y.tolist() == [1.0, -2.0, 5.0]  # one process: sum and max are the identity
    assert y is not x
    c = torch.tensor([4, 7])  # a CPU counter on a CPU group: no move needed, still a copy
    z = reduce(c)
    assert z.device == torch.device("cpu") and z.tolist() == [4, 7] and z is not c


def test_group_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert D.group_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert D.group_device() == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert D.group_device() is None  # a group for both devices: tensors stay where they are


def test_every_tensor_collective_goes_through_chatforge_distributed():
    """Outside chatforge/distributed.py no code calls a torch.distributed tensor collective directly (the
    helpers there are the ones that move tensors to the group's device)."""
    pattern = re.compile(r"\b(?:dist|torch\.distributed)\.(" + "|".join(TENSOR_COLLECTIVES) + r")\(")
    offenders = []
    for f in sorted((ROOT / "chatforge").rglob("*.py")):
        if f.name == "distributed.py" and f.parent.name == "chatforge":
            continue
        for n, line in enumerate(f.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "call the helpers of chatforge/distributed.py instead:\n" + "\n".join(offenders)
