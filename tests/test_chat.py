"""`chatforge chat`: piped input (one user line per turn), multi-turn history, /reset and /quit."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys

import pytest
import torch

from chatforge.commands import chat
from chatforge.config import ModelConfig
from chatforge.engine import Engine
from chatforge.model.gpt import GPT
from chatforge.model.save import save_model_dir
from chatforge.tokenizer import ChatTokenizer, train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("chat") / "model"
    tok = train_tokenizer(["Hello, how are you? What is 2 plus 3? 2 plus 3 is 5. Sure! I hope this helps!"] * 20, 300)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)
    model = GPT(cfg, tok.vocab_size)
    model.init_weights()
    save_model_dir(model, d, cfg, tok)
    return d


def args_for(model_dir, **kw):
    base = dict(model=str(model_dir), system=None, temperature=0.7, top_k=None, top_p=None, max_new_tokens=6,
                seed=0, device="cpu")
    return argparse.Namespace(**{**base, **kw})


def test_piped_input_answers_each_line(model_dir):
    stdin = "Hello!\n/reset\nWhat is 2 plus 3?\n\n/quit\nnever read\n"
    res = subprocess.run([sys.executable, "-m", "chatforge", "chat", "--model", str(model_dir), "--max-new-tokens", "6",
                          "--temperature", "0"], input=stdin, capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")
    assert len(lines) == 3 and lines[2] == ""  # two answers, one line each, no prompt decorations
    assert "you>" not in res.stdout and "bot>" not in res.stdout


def test_history_reset_and_sampling_options(model_dir, monkeypatch, capsys):
    seen = []
    real_stream = Engine.stream

    def spy(self, prompt_ids, max_new_tokens, **kw):
        seen.append((list(prompt_ids), max_new_tokens, kw))
        return real_stream(self, prompt_ids, max_new_tokens, **kw)

    monkeypatch.setattr(Engine, "stream", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first turn\nsecond turn\n/reset\nthird turn\n"))
    assert chat.main(args_for(model_dir, top_k=5, top_p=0.9, temperature=1.3, max_new_tokens=4), []) == 0
    tok = ChatTokenizer.load(model_dir)
    texts = [tok.decode(ids) for ids, _, _ in seen]
    assert len(texts) == 3
    assert "first turn" in texts[1] and "second turn" in texts[1] and texts[1].count("<|assistant|>") == 2
    assert "first turn" not in texts[2] and "second turn" not in texts[2]  # /reset cleared the history
    assert all(t.startswith("<|endoftext|><|user|>") and t.endswith("<|assistant|>") for t in texts)
    _, n, kw = seen[0]
    assert n == 4 and kw["top_k"] == 5 and kw["top_p"] == 0.9 and kw["temperature"] == 1.3
    assert tok.end_id in kw["stop_ids"]
    assert len(capsys.readouterr().out.splitlines()) == 3


def test_same_seed_same_answers(model_dir, monkeypatch, capsys):
    outs = []
    for _ in range(2):
        monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 plus 3?\n"))
        chat.main(args_for(model_dir, temperature=1.0, max_new_tokens=8, seed=3), [])
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].strip()


def test_long_history_is_trimmed_to_the_context(model_dir):
    tok = ChatTokenizer.load(model_dir)
    history = []
    for i in range(20):
        history += [{"role": "user", "content": f"question {i} is long enough"}, {"role": "assistant", "content": "ok"}]
    history.append({"role": "user", "content": "last"})
    ids = chat.fit_history(tok, [], history, block_size=64, reserve=16)
    assert len(ids) + 16 <= 64
    text = tok.decode(ids)
    assert text.endswith("<|user|>last<|end|><|assistant|>") and "question 0 " not in text
