"""Micro model directories for the serving tests: a native chat model, a Hugging Face (Qwen2) chat model and a
reward model, all with one small BPE tokenizer; built locally (no downloads) in a few seconds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

from chatforge.config import ModelConfig
from chatforge.model.gpt import GPT
from chatforge.model.heads import ScalarModel
from chatforge.model.save import save_model_dir
from chatforge.tokenizer import train_tokenizer

TEXT = ["Hello, how are you? What is 2 plus 3? 2 plus 3 is 5. Sure! I hope this helps! "
        "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \u00fcber", "the quick brown fox jumps over the lazy dog. "] * 20
REWARD_NORM = {"mean": 0.25, "std": 2.0}


def micro_tokenizer():
    return train_tokenizer(TEXT, 320)


def micro_gpt(vocab_size: int, seed: int = 0, block_size: int = 96) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=64, block_size=block_size, tie_embeddings=False)
    m = GPT(cfg, vocab_size)
    m.init_weights(0.15)  # a larger init: peaked, varied next-token distributions
    return m.eval()


def build_chat_dir(root: Path, name: str = "chat", seed: int = 0) -> Path:
    tok = micro_tokenizer()
    m = micro_gpt(tok.vocab_size, seed)
    d = Path(root) / name
    save_model_dir(m, d, m.cfg, tok)
    return d


def build_reward_dir(root: Path, name: str = "rm", norm: bool = True) -> Path:
    tok = micro_tokenizer()
    rm = ScalarModel.from_trunk(micro_gpt(tok.vocab_size, seed=1), score_std=1.0).eval()
    d = Path(root) / name
    save_model_dir(rm, d, rm.cfg, tok)
    if norm:
        (d / "chatforge.json").write_text(json.dumps({"stage": "rm", "reward_norm": REWARD_NORM}))
    return d


def build_hf_chat_dir(root: Path, name: str = "qwen") -> Path:
    """A tiny Qwen2 (q/k/v biases: not the native architecture, so it runs through transformers)."""
    import transformers as T

    tok = micro_tokenizer()
    torch.manual_seed(2)
    cfg = T.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                        tie_word_embeddings=False, pad_token_id=tok.pad_id, bos_token_id=tok.bos_id,
                        eos_token_id=tok.end_id)
    m = T.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.15)
    d = Path(root) / name
    m.save_pretrained(d)
    tok.save(d)
    return d


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], log: Path, timeout_s: float = 120):
    """``chatforge serve ARGS`` on 127.0.0.1 on a free port in a subprocess (its output in ``log``): yields the URL
    once /health answers, and stops the server by pid at the end (SIGTERM, then SIGKILL). A server that exits or
    does not answer within ``timeout_s`` fails the test with its log."""
    import pytest

    root = Path(__file__).resolve().parents[1]
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("CHATFORGE_API_KEY", None)
    cmd = [sys.executable, "-m", "chatforge", "serve", *args, "--port", str(port), "--log-level", "warning"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not answer within {timeout_s:.0f} s:\n{log.read_text()}")
            time.sleep(0.2)
        yield url
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
