"""Stage 1 end to end: a micro pretraining run, its golden loss curve, exact resume, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatforge.config import load_config
from chatforge.data.pretrain import TokenLoader, build_token_data, iter_documents
from chatforge.data.records import DataError
from chatforge.metrics import read_metrics
from chatforge.stages import pretrain
from chatforge.trainer import TrainingError
from tests.conftest import ROOT, interrupted_then_resumed

MICRO = ROOT / "configs" / "micro.yaml"
GOLDEN = Path(__file__).parent / "golden" / "pretrain_micro.json"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """200 KB of generated demo text (chatforge.demo), the same with or without ../shared."""
    from chatforge.demo.corpus import generate_corpus

    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("<|endoftext|>".join(generate_corpus(0, 200_000)), encoding="utf-8")
    return path


def micro_cfg(corpus: Path, *extra: str):
    return load_config("pretrain", MICRO, [f"data.path=[{corpus}]", "train.device=cpu", *extra])  # golden: CPU


def losses_of(out: Path, kind: str = "train", key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(out) if r.get("kind") == kind]


@pytest.fixture(scope="module")
def micro_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "base"
    pretrain.run(micro_cfg(corpus), out)
    return out


def test_val_loss_falls_and_dir_is_complete(micro_run):
    evals = losses_of(micro_run, "eval", "val_loss")
    assert len(evals) == 4  # step 0, 10, 20, 30
    assert evals[-1] < evals[0] - 0.8, evals
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chatforge.json", "metrics.jsonl"):
        assert (micro_run / name).is_file(), name
    info = json.loads((micro_run / "chatforge.json").read_text())
    assert info["stage"] == "pretrain" and info["seed"] == 1337
    assert info["config"]["optim"]["lr"] == 3e-3 and info["data"]["fingerprint"]
    assert info["torch_version"] == torch.__version__ and "git_commit" in info


def test_golden_loss_curve(micro_run):
    """A fixed-seed micro run on generated demo text reproduces its recorded loss curve (refactors must keep
    the numbers; the other stages' goldens are in tests/test_golden.py)."""
    curve = losses_of(micro_run)
    if os.environ.get("CHATFORGE_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"loss": curve}, indent=1))
    golden = json.loads(GOLDEN.read_text())["loss"]
    diff = [f"step {i + 1}: recorded {g!r}, now {c!r}" for i, (c, g) in enumerate(zip(curve, golden))
            if c != pytest.approx(g, rel=1e-5, abs=1e-6)]
    assert len(curve) == len(golden) and not diff, "pretrain golden curve changed:\n" + "\n".join(diff)


def test_transformers_loads_the_base_model(micro_run):
    from transformers import AutoModelForCausalLM

    from chatforge.model.load import load_causal_lm

    ours, _, tok = load_causal_lm(micro_run)
    theirs = AutoModelForCausalLM.from_pretrained(micro_run).eval()
    ids = torch.tensor([[tok.bos_id] + tok.encode("ROMEO: what say you?")])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4)


def test_exact_resume_after_interrupt(corpus, micro_run, tmp_path, monkeypatch):
    """Kill the run with SIGINT inside step 13; rerunning resumes to the uninterrupted curve exactly."""
    out = tmp_path / "base"

    def checkpointed_at_13():
        assert not (out / "model.safetensors").exists()
        assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 13

    interrupted_then_resumed(monkeypatch, TokenLoader, "next", 13, lambda: pretrain.run(micro_cfg(corpus), out),
                             between=checkpointed_at_13)
    assert losses_of(out) == losses_of(micro_run)
    assert losses_of(out, "eval", "val_loss") == losses_of(micro_run, "eval", "val_loss")
    steps = [r["step"] for r in read_metrics(out) if r["kind"] == "train"]
    assert steps == list(range(1, 31))  # metrics.jsonl was cut back to the checkpoint, no duplicates


def test_batch_invariance_accumulation(corpus, tmp_path):
    """batch 8 x accumulation 1 == batch 4 x accumulation 2 (same windows, same loss and update)."""
    a = tmp_path / "a"
    b = tmp_path / "b"
    common = ["train.max_steps=3", "train.eval_every=0", "train.ckpt_every=0", "data.sampling=sequential"]
    pretrain.run(micro_cfg(corpus, *common, "train.batch_size=8", "train.grad_accum=1"), a)
    pretrain.run(micro_cfg(corpus, *common, "train.batch_size=4", "train.grad_accum=2"), b)
    assert losses_of(a) == pytest.approx(losses_of(b), rel=1e-5)


def test_txt_is_one_document_unless_separated(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("para one\n\npara two\n\n\npara three")
    assert list(iter_documents([one])) == ["para one\n\npara two\n\n\npara three"]
    many = tmp_path / "many.txt"
    many.write_text("a story<|endoftext|>another story<|endoftext|>")
    assert list(iter_documents([many])) == ["a story", "another story"]
    jl = tmp_path / "docs.jsonl"
    jl.write_text('{"text": "x"}\n{"text": "y"}\n')
    assert list(iter_documents([jl])) == ["x", "y"]


def test_token_cache_is_reused_and_invalidated(corpus, micro_run, tmp_path):
    """One content-addressed entry per (contents, tokenizer, split): reused from another path, rebuilt when
    the split changes."""
    from chatforge.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(micro_run)
    d1 = build_token_data([str(corpus)], tok, tmp_path / "tok", 0.1, progress=False)
    shard = Path(d1.meta["dir"]) / d1.meta["streams"]["train"]["shards"][0]["file"]
    mtime = shard.stat().st_mtime_ns
    moved = tmp_path / "elsewhere" / "copy.txt"
    moved.parent.mkdir()
    moved.write_bytes(corpus.read_bytes())
    d2 = build_token_data([str(moved)], tok, tmp_path / "tok", 0.1, progress=False)
    assert shard.stat().st_mtime_ns == mtime and d2.meta["dir"] == d1.meta["dir"]
    assert d1.meta["train_tokens"] == d2.meta["train_tokens"] and d1.train[0:1][0] == tok.bos_id
    d3 = build_token_data([str(corpus)], tok, tmp_path / "tok", 0.2, progress=False)
    assert d3.meta["dir"] != d1.meta["dir"] and d3.meta["val_tokens"] > d1.meta["val_tokens"]


@pytest.mark.parametrize(
    "content, problem",
    [
        (None, "no such file"),
        (b"", "empty"),
        (b"   \n\n  ", "empty"),
        (b"short", "fewer than one context"),
        (b"caf\xe9 au lait " * 100, "not valid UTF-8"),
    ],
)
def test_bad_corpus_errors(tmp_path, content, problem):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    cfg = load_config("pretrain", MICRO, [f"data.path=[{path}]", "tokenizer.vocab_size=0"])
    with pytest.raises(DataError, match=problem) as e:
        pretrain.run(cfg, tmp_path / "out")
    assert "corpus.txt" in str(e.value)


def test_nan_loss_stops_with_step_and_keeps_previous_model(corpus, micro_run, tmp_path, monkeypatch):
    out = tmp_path / "base"
    pretrain.run(micro_cfg(corpus, "train.max_steps=4", "train.eval_every=0"), out)
    before = (out / "model.safetensors").read_bytes()
    import chatforge.losses as L

    real = L.lm_loss
    monkeypatch.setattr(L, "lm_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    with pytest.raises(TrainingError, match=r"step 5: the loss is nan"):
        pretrain.run(micro_cfg(corpus, "train.max_steps=8", "train.eval_every=0"), out)
    assert (out / "model.safetensors").read_bytes() == before


def test_cli_config_typo_is_one_line_error(corpus, tmp_path):
    r = subprocess.run([sys.executable, "-m", "chatforge", "pretrain", "--config", str(MICRO), "--out",
                        str(tmp_path / "o"), f"--data.path={corpus}", "--optim.lrr=1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error:") and "optim.lrr" in r.stderr and "optim.lr" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_sample_prints_text(micro_run):
    r = subprocess.run([sys.executable, "-m", "chatforge", "sample", "--model", str(micro_run), "--prompt",
                        "ROMEO:", "--max-new-tokens", "20", "--seed", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > len("ROMEO:") + 5
