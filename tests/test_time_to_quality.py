"""benchmarks/time_to_quality.py: both loops see the same symbols and validation text; the target rule."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks import time_to_quality as ttq
from benchmarks.peers.nanogpt_style import char_data, document_data
from chatforge.data.pretrain import build_token_data
from chatforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.timeout(120)


def _chatforge_streams(path: Path, cache: Path):
    """chatforge's (train, val) token ids of ``path`` with a bytes-only vocabulary and the tail split."""
    tok = train_tokenizer(iter(()), 0)
    td = build_token_data([str(path)], tok, cache, 0.1, progress=False, split="tail")
    return tok, np.asarray(td.train), np.asarray(td.val)


def _as_bytes(ids, symbol_of) -> list[int]:
    return [symbol_of[int(i)] for i in ids]


def _same_streams(path: Path, cache: Path) -> None:
    """The baseline's --stream documents ids and chatforge's ids spell the same bytes (end-of-text = -1)."""
    text = path.read_text(encoding="utf-8")
    tr, va, vocab = document_data(str(path))
    tok, ctr, cva = _chatforge_streams(path, cache)
    values = sorted(set(text.replace("<|endoftext|>", "").encode()))
    ours = {i: v for i, v in enumerate(values)} | {len(values): -1}
    assert vocab == len(values) + 1
    theirs = {0: -1}  # <|endoftext|> is chatforge's id 0; a byte's id is read off encoding each character
    for c in set(text):
        for i, b in zip(tok.encode(c), c.encode()):
            theirs[i] = b
    assert len(tr) == len(ctr) and len(va) == len(cva)
    assert _as_bytes(tr, ours) == _as_bytes(ctr, theirs)
    assert _as_bytes(va, ours) == _as_bytes(cva, theirs)


def test_documents_stream_matches_chatforge_loader(tmp_path):
    # separators with and without newlines, a blank document, multi-byte characters in both splits
    docs = ["\nOnce upon a time “Tim” ran.\n", "\n \n", "\nA cat sat. Ünïcode ✓ here.\n" * 3, "\nThe end “!”\n"]
    p = tmp_path / "stories.txt"
    p.write_text("<|endoftext|>".join(docs) + "<|endoftext|>\n", encoding="utf-8")
    _same_streams(p, tmp_path / "cache")
    tr, va, vocab = document_data(str(p))
    eot = vocab - 1
    stream = np.concatenate([tr, va])
    assert int((stream == eot).sum()) == 3  # the blank document and the blank tail are dropped
    n_bytes = sum(len(d.encode()) for d in docs if d.strip())
    assert len(stream) == n_bytes + 3 and len(va) == int(0.1 * (n_bytes + 3))


def test_documents_stream_on_ascii_is_nanogpts_characters_after_one_mark(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
    p = tmp_path / "plays.txt"
    p.write_text(text, encoding="utf-8")
    tr, va, vocab = document_data(str(p))
    ctr, cva, cvocab = char_data(str(p))
    assert vocab == cvocab + 1  # the characters' ids (sorted), then the end-of-text id
    stream = np.concatenate([tr, va])
    assert stream[0] == cvocab and np.array_equal(stream[1:], np.concatenate([ctr, cva]))
    assert len(va) == int(0.1 * (len(text) + 1))
    _same_streams(p, tmp_path / "cache")


def test_tinystories_sample_same_validation_text(shared_data, tmp_path):
    path = shared_data / "pretrain" / "tinystories_sample.txt"
    if not path.is_file():
        pytest.skip("tinystories_sample.txt not in the shared data folder")
    _same_streams(path, tmp_path / "cache")
    tr, va, vocab = document_data(str(path))
    assert (len(tr), len(va)) == (3360, 373)  # 5 stories, 3,728 bytes + 5 end-of-text marks


def _fake_runs(tmp_path: Path, base_loss: float, cf_loss: float) -> tuple[Path, Path]:
    base = tmp_path / "baseline.json"
    base.write_text(json.dumps({"val_loss": base_loss, "train_s": 150.0, "eval_s": 2.0, "wall_s": 155.0,
                                "val_tokens": 373}))
    run = tmp_path / "run"
    run.mkdir()
    (run / "chatforge.json").write_text(json.dumps({
        "wall_s": 70.0, "data": {"val_tokens": 373},
        "metrics": {"eval_val_loss": cf_loss, "train_elapsed_s": 60.0, "steps": 300}}))
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"kind": "train", "step": 300, "loss": 1.5, "elapsed_s": 60.0},
        {"kind": "eval", "step": 300, "eval_s": 2.5, "val_loss": cf_loss}]) + "\n")
    return base, run


def test_results_parsed_and_target_rule(tmp_path):
    base, run = _fake_runs(tmp_path, 1.8881, 1.8702)
    b, c = ttq.baseline_result(base), ttq.chatforge_result(run)
    assert b["val_loss"] == 1.8881 and c["val_loss"] == 1.8702
    assert (c["train_s"], c["eval_s"], c["run_s"], c["val_tokens"]) == (60.0, 2.5, 70.0, 373)
    v = ttq.verdict(160.0, b["val_loss"], 76.0, c["val_loss"])
    assert v["reached"] and v["time_to_target_s"] == 76.0 and v["ratio"] == pytest.approx(0.475)
    assert ttq.verdict(160.0, 1.8881, 76.0, 1.8881)["reached"]  # equal to the target counts
    miss = ttq.verdict(160.0, 1.8881, 76.0, 1.8882)
    assert not miss["reached"] and math.isinf(miss["ratio"])


def test_results_without_a_loss_are_refused(tmp_path):
    (tmp_path / "b.json").write_text(json.dumps({"val_loss": float("nan")}))
    with pytest.raises(ValueError, match="val_loss"):
        ttq.baseline_result(tmp_path / "b.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "chatforge.json").write_text(json.dumps({"metrics": {"train_loss": 1.0}}))
    with pytest.raises(ValueError, match="eval_val_loss"):
        ttq.chatforge_result(run)


def test_main_runs_baseline_then_chatforge_per_corpus(tmp_path, monkeypatch):
    """The script's flow with the two processes faked: commands, the same data path for both, the table row."""
    calls = []
    walls = iter([(160.0, 300.0), (76.0, 140.0), (150.0, 290.0), (80.0, 150.0)])

    def fake_timed(cmd, env, log, timeout):
        calls.append(cmd)
        if "--json" in cmd:  # the baseline
            Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps({"val_loss": 1.9, "val_tokens": 10}))
        else:
            run = Path(cmd[cmd.index("--out") + 1])
            run.mkdir(parents=True)
            (run / "chatforge.json").write_text(json.dumps({"wall_s": 70.0, "data": {"val_tokens": 10}, "metrics": {
                "eval_val_loss": 1.85 if "a.txt" in " ".join(cmd) else 1.95, "train_elapsed_s": 60.0}}))
        return next(walls)

    monkeypatch.setattr(ttq, "timed", fake_timed)
    rows = ttq.main(["--data", "a.txt", "b.txt", "--config", "configs/x.yaml", "--threads", "2",
                     "--keep", str(tmp_path / "work"), "--json", str(tmp_path / "out.json")])
    assert [Path(c[c.index("--data") + 1]).name for c in calls[0::2]] == ["a.txt", "b.txt"]
    assert all("--stream" in c and c[c.index("--threads") + 1] == "2" for c in calls[0::2])
    assert all("--config" in c and "--train.threads=2" in c for c in calls[1::2])
    assert [Path(c[-3].split("=", 1)[1]).name for c in calls[1::2]] == ["a.txt", "b.txt"]
    assert rows[0]["reached"] and rows[0]["ratio"] == pytest.approx(76 / 160)
    assert not rows[1]["reached"] and math.isinf(rows[1]["ratio"])
    assert rows[0]["chatforge_startup_s"] == pytest.approx(6.0)
    assert rows[0]["cpu_ratio"] == pytest.approx(140 / 300) and math.isinf(rows[1]["cpu_ratio"])
    assert json.loads((tmp_path / "out.json").read_text())["rows"][0]["corpus"] == "a.txt"


def test_timed_measures_a_process_and_reports_its_failure(tmp_path):
    import sys

    wall, cpu = ttq.timed([sys.executable, "-c", "sum(range(10**6))"], {}, tmp_path / "ok.log", timeout=60)
    assert wall > 0 and 0 < cpu < wall + 5
    with pytest.raises(RuntimeError, match="(?s)exited with 3.*boom"):
        ttq.timed([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], {}, tmp_path / "bad.log", timeout=60)


def test_speedrun_preset_and_its_first_name_are_the_same_config():
    from chatforge.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    new, old = load_config("pretrain", root / "speedrun.yaml"), load_config("pretrain", root / "shakespeare_speedrun.yaml")
    assert new == old
    assert (new.model.n_layer, new.model.n_head, new.model.n_embd, new.model.block_size) == (4, 4, 128, 64)
    assert (new.tokenizer.vocab_size, new.data.val_split, new.data.val_fraction, new.train.eval_batches) == (0, "tail", 0.1, 0)
