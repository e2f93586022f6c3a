"""Pretraining data at scale: streaming sources, token shards, the shared cache, resume, mixtures."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.data import shards as S
from chatforge.data import sources
from chatforge.data.pretrain import MixtureLoader, TokenLoader, build_token_data, val_windows
from chatforge.data.records import DataError
from chatforge.tokenizer import ChatTokenizer, train_tokenizer


@pytest.fixture(scope="module")
def byte_tok() -> ChatTokenizer:
    return train_tokenizer([], 0)  # one token per byte: encoding pieces == encoding the whole document


@pytest.fixture(scope="module")
def bpe_tok() -> ChatTokenizer:
    text = "the quick brown fox jumps over the lazy dog; héllo wörld. " * 200
    return train_tokenizer([text], 300)


def docs_of(i: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "épsilon", "ζeta", "eta\n", "theta", "\n\n"]
    return "".join(words[(i * 7 + k) % len(words)] + " " for k in range(3 + (i * 13) % 40))


def write_corpus(root: Path) -> tuple[list[str], list[str]]:
    """Documents over five files in every format; returns (paths to pass, documents in reading order)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = [docs_of(i) for i in range(40)]
    root.mkdir(parents=True, exist_ok=True)
    # a .txt with separators (and a blank document between two separators, which is dropped)
    (root / "a.txt").write_text(sources.EOT.join(docs[:8][:4] + ["  \n "] + docs[4:8]), encoding="utf-8")
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[8:16]) + "\n", encoding="utf-8")
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[16:24]))
    (root / "d.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(sources.EOT.join(docs[24:32]).encode()))
    pq.write_table(pa.table({"id": list(range(8)), "text": docs[32:40]}), root / "e.parquet", row_group_size=3)
    return [str(root / "a.txt"), str(root / "b.jsonl"), str(root / "*.gz"), str(root / "d.txt.zst"),
            str(root / "e.parquet")], docs


def reference(tok, docs: list[str]) -> np.ndarray:
    """The stream of encoding each document alone: <|endoftext|> + tokens, one after the other."""
    return np.array([t for d in docs for t in [tok.bos_id, *tok.encode(d)]], dtype=np.int64)


def shard_bytes(entry: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(entry.glob("*.bin"))}


@pytest.mark.parametrize("tok_name", ["byte_tok", "bpe_tok"])
def test_shards_hold_each_document_encoded_alone(tok_name, tmp_path, request, monkeypatch):
    """Five files in five formats, tiny shards (documents cross shard boundaries), tiny read blocks
    (separators and UTF-8 characters cross block boundaries): the shards are the reference stream."""
    tok = request.getfixturevalue(tok_name)
    monkeypatch.setattr(sources, "READ_BYTES", 7)
    paths, docs = write_corpus(tmp_path / "corpus")
    assert list(sources.iter_documents(sources.corpus_files(paths))) == docs
    data = build_token_data(paths, tok, tmp_path / "cache", 0.25, progress=False, shard_tokens=37)
    val_ids = [i for i in range(len(docs)) if (i + 1) // 4 > i // 4]  # 3, 7, 11, ...: every 4th document
    assert val_ids == list(range(3, 40, 4))
    train_ref = reference(tok, [d for i, d in enumerate(docs) if i not in val_ids])
    val_ref = reference(tok, [docs[i] for i in val_ids])
    assert np.array_equal(np.asarray(data.train, dtype=np.int64), train_ref)
    assert np.array_equal(np.asarray(data.val, dtype=np.int64), val_ref)
    index = json.loads((Path(data.meta["dir"]) / "index.json").read_text())
    shards = index["streams"]["train"]["shards"]
    assert [s["tokens"] for s in shards[:-1]] == [37] * (len(shards) - 1) and 0 < shards[-1]["tokens"] <= 37
    assert sum(s["documents"] for s in shards) == 30 and index["streams"]["val"]["documents"] == 10
    assert shards[0]["sources"] == [0] and shards[-1]["sources"] == [4]  # a.txt ... e.parquet
    import hashlib

    for s in shards:
        assert hashlib.sha256((Path(data.meta["dir"]) / s["file"]).read_bytes()).hexdigest() == s["sha256"]


def test_long_documents_are_cut_into_pieces_and_stay_whole(byte_tok, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_CHARS", 50)
    monkeypatch.setattr(sources, "READ_BYTES", 16)
    long_doc = "".join(f"line {i} of a long document\n" for i in range(40))
    path = tmp_path / "long.txt"
    path.write_text(f"short{sources.EOT}{long_doc}{sources.EOT}   {sources.EOT}{long_doc}x")
    pieces = list(sources.iter_pieces([path]))
    assert [p.doc for p in pieces if p.first] == [0, 1, 2]
    assert max(len(p.text) for p in pieces) <= 50 and len(pieces) > 40
    assert list(sources.iter_documents([path])) == ["short", long_doc, long_doc + "x"]
    assert all(p.text.endswith("\n") for p in pieces[1:-1] if not pieces[pieces.index(p) + 1].first)
    data = build_token_data([str(path)], byte_tok, tmp_path / "cache", 0.0, progress=False, shard_tokens=64)
    assert np.array_equal(np.asarray(data.train, dtype=np.int64), reference(byte_tok, ["short", long_doc, long_doc + "x"]))


def test_split_rules(byte_tok, tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("a single long document " * 50)
    d = build_token_data([str(one)], byte_tok, tmp_path / "c", 0.1, progress=False, shard_tokens=100)
    n = len(d.train) + len(d.val)
    assert len(d.val) == int(n * 0.1) and d.meta["split"].startswith("tail")  # no whole document to hold out
    tail = build_token_data([str(one)], byte_tok, tmp_path / "c", 0.1, progress=False, split="tail", shard_tokens=100)
    assert np.array_equal(np.asarray(tail.val), np.asarray(d.val)) and tail.meta["dir"] != d.meta["dir"]
    held = tmp_path / "held.jsonl"
    held.write_text('{"text": "held out"}\n')
    sep = build_token_data([str(one)], byte_tok, tmp_path / "c", 0.1, progress=False, val_paths=[str(held)])
    assert np.array_equal(np.asarray(sep.val, dtype=np.int64), reference(byte_tok, ["held out"]))
    assert len(sep.train) == n and sep.meta["split"] == "files"


def test_loader_over_shards_equals_one_array(bpe_tok, tmp_path):
    paths, _ = write_corpus(tmp_path / "corpus")
    data = build_token_data(paths, bpe_tok, tmp_path / "cache", 0.1, progress=False, shard_tokens=23)
    assert len(data.meta["streams"]["train"]["shards"]) > 10
    whole = np.asarray(data.train).copy()
    for sampling in ("random", "sequential"):
        a = TokenLoader(data.train, 16, 4, sampling=sampling, seed=3)
        b = TokenLoader(whole, 16, 4, sampling=sampling, seed=3)
        ranks = [TokenLoader(data.train, 16, 4, sampling=sampling, seed=3, rank=r, world_size=2) for r in (0, 1)]
        for _ in range(6):
            xa, xb = a.next(2), b.next(2)
            assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(xa, xb))
            r0, r1 = ranks[0].next(1), ranks[1].next(1)  # 2 ranks x 1 micro-batch == 1 rank x 2
            assert torch.equal(torch.cat([r0[0][0], r1[0][0]]), torch.cat([xa[0][0], xa[1][0]]))
        state = a.state_dict()
        assert {"gen", "cursor", "shard", "offset"} <= set(state)
        nxt = a.next(1)
        a.load_state_dict(state)
        assert torch.equal(a.next(1)[0][0], nxt[0][0])
    assert [torch.equal(x, y) for (x, _), (y, _) in zip(val_windows(data.val, 8, 3), val_windows(np.asarray(data.val), 8, 3))]


@pytest.mark.parametrize("stop_after", [1, 4, 9])
def test_interrupted_tokenization_resumes_to_identical_shards(bpe_tok, tmp_path, monkeypatch, stop_after):
    """Kill the tokenization after a finished shard; the rerun resumes there (re-encoding only what the
    unfinished shards need) and ends with byte-identical shards and index."""
    paths, docs = write_corpus(tmp_path / "corpus")
    kw = dict(progress=False, shard_tokens=29, batch_chars=200)
    _, ref_index = S.build_shards(sources.corpus_files(paths), bpe_tok, cache=tmp_path / "ref", **kw)
    ref_entry = tmp_path / "ref" / ref_index["key"]

    finished = {"n": 0}
    real_finish = S._ShardWriter._finish

    def finish_then_die(self):
        real_finish(self)
        finished["n"] += 1
        if finished["n"] == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(S._ShardWriter, "_finish", finish_then_die)
    with pytest.raises(KeyboardInterrupt):
        S.build_shards(sources.corpus_files(paths), bpe_tok, cache=tmp_path / "run", **kw)
    monkeypatch.setattr(S._ShardWriter, "_finish", real_finish)
    entry = tmp_path / "run" / ref_index["key"]
    assert (entry / "progress.json").is_file() and not (entry / "index.json").exists()
    encoded: list[str] = []
    real_batch = bpe_tok.encode_batch
    monkeypatch.setattr(bpe_tok, "encode_batch", lambda texts: (encoded.extend(texts), real_batch(texts))[1])
    _, index = S.build_shards(sources.corpus_files(paths), bpe_tok, cache=tmp_path / "run", **kw)
    assert shard_bytes(entry) == shard_bytes(ref_entry)
    drop = ("tokenize_s",)
    assert {k: v for k, v in index.items() if k not in drop} == {k: v for k, v in ref_index.items() if k not in drop}
    assert 0 < len(encoded) <= len(docs) and (stop_after == 1 or len(encoded) < len(docs))  # resumed, not restarted
    assert not (entry / "progress.json").exists() and not list(entry.glob(".*.tmp"))


def test_mixture_proportions_and_resume():
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 50, n).astype(np.uint16) for n in (5000, 300, 2000))
    weights = [0.6, 0.3, 0.1]
    src = list(zip(["a", "b", "c"], [a, b, c], weights))
    loader = MixtureLoader(src, 8, 10, seed=1)
    for _ in range(100):
        loader.next(2)  # 2000 windows
    counts = np.array([loader.metrics()[f"tokens/{n}"] for n in "abc"]) / 8
    n = counts.sum()
    assert n == 2000
    for got, p in zip(counts / n, weights):
        assert abs(got - p) < 4 * np.sqrt(p * (1 - p) / n), (got, p)
    # windows come from their own source only, and the state resumes exactly
    state = loader.state_dict()
    x = loader.next(1)[0][0]
    loader.load_state_dict(state)
    assert torch.equal(loader.next(1)[0][0], x)
    two = [MixtureLoader(src, 8, 5, seed=1, rank=r, world_size=2) for r in (0, 1)]
    one = MixtureLoader(src, 8, 5, seed=1)
    for _ in range(3):
        ref = one.next(2)
        assert torch.equal(torch.cat([two[0].next(1)[0][0], two[1].next(1)[0][0]]), torch.cat([ref[0][0], ref[1][0]]))


def test_mixture_pretraining_logs_realised_tokens(tmp_path):
    from chatforge.config import load_config
    from chatforge.metrics import read_metrics
    from chatforge.stages import pretrain
    from tests.conftest import ROOT

    for name, word in (("en", "hello there friend "), ("xx", "zq zq zq ")):
        (tmp_path / f"{name}.txt").write_text(sources.EOT.join(word * (5 + i % 7) for i in range(200)))
    mix = f"[{{path: {tmp_path / 'en.txt'}, weight: 3}}, {{path: {tmp_path / 'xx.txt'}, weight: 1, name: other}}]"
    cfg = load_config("pretrain", ROOT / "configs" / "micro.yaml", [
        f"data.mixture={mix}", "tokenizer.vocab_size=0", "train.max_steps=4", "train.eval_every=0",
        "train.ckpt_every=0", "model.block_size=16", f"data.cache_dir={tmp_path / 'cache'}"])
    pretrain.run(cfg, tmp_path / "out")
    last = [r for r in read_metrics(tmp_path / "out") if r["kind"] == "train"][-1]
    assert last["tokens/en"] + last["tokens/other"] == 4 * 8 * 16 and last["tokens/en"] > last["tokens/other"]
    info = json.loads((tmp_path / "out" / "chatforge.json").read_text())
    assert info["data"]["tokens/en"] == last["tokens/en"] and len(info["data"]["files"]) == 2


def test_tokenizer_sample_is_bounded_and_covers_every_file(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text(sources.EOT.join(f"{name} document {i} " * 10 for i in range(100)))
    files = sources.corpus_files([str(tmp_path)])
    sample = list(sources.tokenizer_sample(files, 2000))
    assert 2000 <= sum(map(len, sample)) < 2000 + 2 * 200
    assert {s[0] for s in sample} == {"a", "b"} and sample == list(sources.tokenizer_sample(files, 2000))
    assert len(list(sources.tokenizer_sample(files, 10**9))) == 200  # small corpus: all of it


def _write_bad(tmp_path: Path, kind: str) -> tuple[Path, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "parquet_no_text":
        p = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"content": ["a", "b"]}), p)
        return p, r"docs\.parquet: parquet file has no column 'text' \(columns: content\)"
    if kind == "parquet_null":
        p = tmp_path / "docs.parquet"
        pq.write_table(pa.table({"text": ["a", None]}), p)
        return p, r"docs\.parquet:2: row 2: column 'text' is NoneType"
    if kind == "corrupt_gzip":
        p = tmp_path / "docs.jsonl.gz"
        good = gzip.compress(b"".join(b'{"text": "doc %d"}\n' % i for i in range(5000)))
        p.write_bytes(good[: len(good) // 2])  # truncated download
        return p, r"docs\.jsonl\.gz:\d+: corrupt or truncated gzip stream"
    if kind == "not_gzip":
        p = tmp_path / "docs.jsonl.gz"
        p.write_bytes(b"this is not gzip data at all")
        return p, r"docs\.jsonl\.gz:1: corrupt or truncated gzip stream"
    if kind == "jsonl_latin1":
        p = tmp_path / "docs.jsonl.gz"
        p.write_bytes(gzip.compress(b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n'))
        return p, r"docs\.jsonl\.gz:3: not valid UTF-8"
    if kind == "txt_latin1":
        p = tmp_path / "docs.txt"
        p.write_bytes(b"line one\nline two\ncaf\xe9\n")
        return p, r"docs\.txt:3: not valid UTF-8"
    if kind == "zst_garbage":
        p = tmp_path / "docs.txt.zst"
        p.write_bytes(b"\x28\xb5\x2f\xfd garbage")
        return p, r"docs\.txt\.zst:1: corrupt or truncated zstd stream"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["parquet_no_text", "parquet_null", "corrupt_gzip", "not_gzip", "jsonl_latin1",
                                  "txt_latin1", "zst_garbage"])
def test_bad_input_names_file_and_record(kind, tmp_path, byte_tok):
    path, pattern = _write_bad(tmp_path, kind)
    with pytest.raises(DataError, match=pattern):
        build_token_data([str(path)], byte_tok, tmp_path / "cache", 0.1, progress=False)


def test_paths_folders_and_globs(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.jsonl", "sub/c.txt.gz", "notes.md"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in sources.corpus_files([str(tmp_path)])] == ["a.jsonl", "b.txt", "c.txt.gz"]
    assert [p.name for p in sources.corpus_files([str(tmp_path / "*.txt")])] == ["b.txt"]
    with pytest.raises(DataError, match="matches no files"):
        sources.corpus_files([str(tmp_path / "*.parquet")])
