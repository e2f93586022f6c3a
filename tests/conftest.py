"""Shared test set-up: offline Hugging Face, small thread counts, the shared data folder."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Micro models run fastest on one thread per process (and torchrun children share 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "CHATFORGE_CACHE" not in os.environ:  # the token cache of this test session (never the user's ~/.cache)
    import atexit
    import shutil
    import tempfile

    os.environ["CHATFORGE_CACHE"] = tempfile.mkdtemp(prefix="chatforge-test-cache-")
    atexit.register(shutil.rmtree, os.environ["CHATFORGE_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CHATFORGE_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    """The read-only public datasets beside the repository (see shared/data/SOURCES.md)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


def interrupted_then_resumed(monkeypatch, cls, name: str, n: int, run, between=None) -> None:
    """``run()`` stopped by SIGINT inside the ``n``-th call of ``cls.name`` (a data loader's ``next``): the Trainer
    checkpoints after the current step and raises ``Interrupted``, as after Ctrl-C. Then ``between()`` (checks on
    the checkpoint, if given), and ``run()`` again with ``cls.name`` restored: the resume."""
    from chatforge.trainer import Interrupted

    real = getattr(cls, name)
    _interrupt_on_call(monkeypatch, cls, name, n)
    with pytest.raises(Interrupted):
        run()
    if between is not None:
        between()
    monkeypatch.setattr(cls, name, real)
    run()


def _interrupt_on_call(monkeypatch, cls, name: str, n: int) -> None:
    import signal

    real = getattr(cls, name)
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapped)
