"""Files chatforge writes get the mode a plain new file gets under the user's umask (not 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from chatforge.checkpoint import atomic_torch_save, atomic_write_json, atomic_write_text, save_checkpoint
from chatforge.config import ModelConfig
from chatforge.model.gpt import GPT
from chatforge.model.hf import save_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert mode(plain) == want  # what every other file gets
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "chatforge.json", {"stage": "sft"})
    atomic_torch_save(tmp_path / "t.pt", {"x": torch.ones(2)})
    save_checkpoint(tmp_path, {"step": 3})
    for name in ("a.txt", "chatforge.json", "t.pt", "checkpoint/state.pt"):
        assert mode(tmp_path / name) == want, name
    # an existing file replaced atomically gets the umask's mode too
    atomic_write_text(tmp_path / "a.txt", "again")
    assert mode(tmp_path / "a.txt") == want
    assert not [p for p in tmp_path.rglob("*.tmp*")]  # no temporary files left


def test_model_directories_follow_the_umask(tmp_path, umask):
    want = 0o666 & ~umask
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)
    out = save_model(GPT(cfg, vocab_size=32), tmp_path / "m", cfg, 32, {"pad_id": 0, "bos_id": 1, "eos_id": 2})
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in files and "config.json" in files
    for name in files:
        assert mode(out / name) == want, name


def test_transformers_model_directories_follow_the_umask(tmp_path, umask):
    T = pytest.importorskip("transformers")
    from chatforge.model.hf_causal import HFCausalLM, save_hf_model

    hf = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=8))
    out = save_hf_model(HFCausalLM(hf), tmp_path / "hf", {"pad_id": 0, "bos_id": 1, "eos_id": 2})
    assert (out / "model.safetensors").is_file()
    for p in out.iterdir():
        assert mode(p) == 0o666 & ~umask, p.name
