"""Pretraining tokenization throughput and memory: chatforge's shard pipeline vs nanoGPT's approach vs
the `tokenizers` library's own ``encode_batch`` (the floor), on the same generated corpus and cores.

The corpus (``--mb`` MiB of JSONL documents in 8 files, 0.5-5 KB each) is generated into a temporary
folder (or ``--dir``): runs of consecutive lines from random places of 8 MB of demo-world documents, or
with ``--public`` of the public texts in ../shared/data (web text, Wikipedia, Shakespeare); it is deleted
afterwards unless ``--keep``. Each method runs in its own process; its peak RSS is the highest total
resident memory of its process tree, sampled every 50 ms.

* ``chatforge``: ``chatforge.data.shards.build_shards`` (streaming reader, ``encode_batch`` on every
  core overlapped with reading and writing, 100M-token shards, per-document validation split).
* ``nanogpt``: in the style of nanoGPT's ``data/openwebtext/prepare.py``: the documents split among
  ``--threads`` worker processes (as ``datasets.map(num_proc=...)`` does), each encoding one
  document at a time (``encode`` + an end-of-text token) into its own temporary file (``datasets``'
  on-disk cache), then the lengths summed and one ``np.memmap`` filled batch by batch.
* ``encode_batch``: the same documents read by the same reader, ``tokenizers.Tokenizer.encode_batch``
  on batches of them, results discarded: what the tokenizer alone costs (the floor).

Then the first training step of a run that reuses chatforge's cache: ``chatforge pretrain`` (a micro
model, the same tokenizer and cache, one step) timed as a process, and from ``run()`` to step 1.

    python benchmarks/tokenize_speed.py --mb 1024 --threads 2
    python benchmarks/tokenize_speed.py --mb 64 --methods chatforge,encode_batch
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, machine_info, print_table, write_json  # noqa: E402  (adds the repo root to sys.path)

N_FILES = 8
SHARED = Path(os.environ.get("CHATFORGE_SHARED_DATA", ROOT.parent / "shared" / "data"))


# ----------------------------------------------------------------------------------------------------
# the corpus


def source_lines(public: bool) -> list[str]:
    lines: list[str] = []
    c4 = SHARED / "pretrain" / "c4_demo.jsonl"
    if public and c4.is_file():
        for rec in map(json.loads, c4.read_text(encoding="utf-8").splitlines()):
            lines += [ln + "\n" for ln in rec["text"].split("\n") if ln.strip()]
        for name in ("pretrain/wikitext2_test.txt", "tinyshakespeare.txt"):
            lines += [ln + "\n" for ln in (SHARED / name).read_text(encoding="utf-8").split("\n") if ln.strip()]
        return lines
    from chatforge.demo.corpus import generate_corpus

    return [d + "\n" for d in generate_corpus(0, 8 << 20)]


def make_corpus(folder: Path, mb: int, seed: int = 0, public: bool = False) -> dict:
    """~mb MiB of documents as JSONL in N_FILES files; documents are runs of consecutive lines."""
    rng = random.Random(seed)
    lines = source_lines(public)
    folder.mkdir(parents=True, exist_ok=True)
    target = mb << 20
    per_file = target // N_FILES
    docs = text_bytes = 0
    for i in range(N_FILES):
        with open(folder / f"part-{i:02d}.jsonl", "w", encoding="utf-8") as f:
            written = 0
            while written < per_file:
                want = rng.randint(500, 5000)
                j = rng.randrange(len(lines))
                parts, n = [], 0
                while n < want:
                    parts.append(lines[j])
                    n += len(lines[j])
                    j = (j + 1) % len(lines)
                text = "".join(parts)
                row = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(row)
                written += len(row)
                docs += 1
                text_bytes += len(text.encode("utf-8"))
    return {"documents": docs, "text_bytes": text_bytes,
            "disk_bytes": sum(p.stat().st_size for p in folder.glob("*.jsonl"))}


def files_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.jsonl"))


# ----------------------------------------------------------------------------------------------------
# the three methods (each runs in its own process: `--run METHOD`)


def run_chatforge(folder: Path, tok_dir: Path, cache: Path) -> dict:
    from chatforge.data.shards import build_shards
    from chatforge.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(tok_dir)
    t0 = time.time()
    _, index = build_shards(files_of(folder), tok, cache=cache, val_fraction=0.001, progress=False)
    return {"seconds": time.time() - t0, "tokens": index["train_tokens"] + index["val_tokens"],
            "shards": len(index["streams"]["train"]["shards"]) + len(index["streams"]["val"]["shards"])}


def _nanogpt_worker(args) -> tuple[str, list[int]]:
    """One worker: its share of the documents, one at a time, into its own file (like datasets' cache)."""
    import numpy as np

    from chatforge.data.sources import iter_documents
    from chatforge.tokenizer import ChatTokenizer

    files, tok_dir, out, rank, world = args
    tok = ChatTokenizer.load(tok_dir)
    eot = tok.eot_id
    lengths = []
    with open(out, "wb") as fh:
        for k, text in enumerate(iter_documents(files)):
            if k % world != rank:  # datasets shards contiguously; the cost is the same
                continue
            ids = tok.encode(text)
            ids.append(eot)
            fh.write(np.asarray(ids, dtype=np.uint16).tobytes())
            lengths.append(len(ids))
    return out, lengths


def run_nanogpt(folder: Path, tok_dir: Path, work: Path, procs: int) -> dict:
    import multiprocessing as mp

    import numpy as np

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    jobs = [(files_of(folder), tok_dir, str(work / f"part{r}.bin"), r, procs) for r in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        parts = pool.map(_nanogpt_worker, jobs)
    total = sum(sum(lengths) for _, lengths in parts)
    arr = np.memmap(work / "train.bin", dtype=np.uint16, mode="w+", shape=(total,))
    idx = 0
    for path, _ in parts:  # filled in batches, as prepare.py does
        src = np.memmap(path, dtype=np.uint16, mode="r")
        for batch in np.array_split(np.arange(len(src)), max(1, len(src) // (1 << 24))):
            if len(batch):
                arr[idx : idx + len(batch)] = src[batch[0] : batch[-1] + 1]
                idx += len(batch)
        del src
    arr.flush()
    return {"seconds": time.time() - t0, "tokens": int(total)}


def run_encode_batch(folder: Path, tok_dir: Path) -> dict:
    from chatforge.data.sources import iter_pieces
    from chatforge.tokenizer import ChatTokenizer

    raw = ChatTokenizer.load(tok_dir)._tok  # the library's Tokenizer (special strings encoded as text)
    encode = getattr(raw, "encode_batch_fast", raw.encode_batch)
    t0 = time.time()
    batch, n, tokens = [], 0, 0
    for p in iter_pieces(files_of(folder)):
        batch.append(p.text)
        n += len(p.text)
        if n >= 4 << 20:
            tokens += sum(len(e) for e in encode(batch, add_special_tokens=False))
            batch, n = [], 0
    if batch:
        tokens += sum(len(e) for e in encode(batch, add_special_tokens=False))
    return {"seconds": time.time() - t0, "tokens": tokens}


def run_first_step(folder: Path, tok_dir: Path, cache: Path, out: Path) -> dict:
    """A pretraining run on the cached corpus: seconds from run() to the end of step 1."""
    t0 = time.time()
    from chatforge import trainer as T
    from chatforge.config import load_config
    from chatforge.stages import pretrain

    imported = time.time() - t0
    first: dict = {}
    real_step = T.Trainer.optimizer_step

    def timed_step(self, *a, **k):
        r = real_step(self, *a, **k)
        first.setdefault("s", time.time() - t_run)
        return r

    T.Trainer.optimizer_step = timed_step
    real_data = pretrain.data_from_config

    def timed_data(*a, **k):  # opening the cached shards (fingerprints from the memo, index, memory maps)
        t = time.time()
        r = real_data(*a, **k)
        first["data_s"] = time.time() - t
        return r

    pretrain.data_from_config = timed_data
    cfg = load_config("pretrain", ROOT / "configs" / "micro.yaml", [
        f"data.path=[{folder}]", f"tokenizer.path={tok_dir}", f"data.cache_dir={cache}", "data.val_fraction=0.001",
        "data.val_split=documents",  # the split run_chatforge built the cache with (micro.yaml pins tail)
        "train.max_steps=1", "train.eval_every=0", "train.eval_batches=1", "train.ckpt_every=0"])
    t_run = time.time()
    pretrain.run(cfg, out)
    return {"import_s": imported, "run_to_first_step_s": first.get("s"), "open_cache_s": first.get("data_s"),
            "run_s": time.time() - t_run}


# ----------------------------------------------------------------------------------------------------
# driver


class Measured:
    """A method running in its own process; its wall time and the peak RSS of its process tree (sampled)."""

    def __init__(self, cmd: list[str], env: dict):
        import psutil

        self.t0 = time.time()
        self.p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
        self.cmd, self.peak, self.stop = cmd, 0, threading.Event()
        proc = psutil.Process(self.p.pid)

        def sample():
            while not self.stop.is_set():
                try:
                    rss = proc.memory_info().rss + sum(c.memory_info().rss for c in proc.children(recursive=True))
                    self.peak = max(self.peak, rss)
                except psutil.Error:
                    pass
                self.stop.wait(0.05)

        self.th = threading.Thread(target=sample, daemon=True)
        self.th.start()

    def result(self) -> tuple[dict, float, float]:
        """(the method's JSON result, wall seconds, peak RSS in MiB)."""
        out, _ = self.p.communicate(timeout=6 * 3600)
        wall = time.time() - self.t0
        self.stop.set()
        self.th.join()
        if self.p.returncode:
            raise SystemExit(f"{' '.join(self.cmd)} failed ({self.p.returncode})")
        return json.loads(out.strip().splitlines()[-1]), wall, self.peak / 2**20


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its waited-for children (pool workers, rayon threads)."""
    import resource

    r = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(x.ru_utime + x.ru_stime for x in r)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=1024, help="corpus size in MiB of JSONL")
    ap.add_argument("--threads", type=int, default=2, help="cores for every method (rayon threads / worker processes)")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--public", action="store_true", help="build the corpus from ../shared/data's public texts")
    ap.add_argument("--methods", default="chatforge,nanogpt,encode_batch,first_step")
    ap.add_argument("--dir", help="work folder (default: a new temporary folder, deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the corpus and outputs")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cpus", help="pin every method to these CPUs (e.g. 0,1), as taskset -c does")
    ap.add_argument("--parallel", action="store_true",
                    help="run the methods at the same time, each pinned to its own --threads cores (0-1, 2-3, ...)")
    ap.add_argument("--run", help=argparse.SUPPRESS)
    ap.add_argument("--args", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cpus:
        try:
            os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})  # children inherit it
        except OSError as e:
            print(f"warning: could not pin to CPUs {a.cpus}: {e}", file=sys.stderr)
    if a.run:  # a child process: one method
        x = json.loads(a.args)
        p = {k: Path(v) for k, v in x.items() if k != "procs"}
        res = {"chatforge": lambda: run_chatforge(p["corpus"], p["tok"], p["cache"]),
               "nanogpt": lambda: run_nanogpt(p["corpus"], p["tok"], p["work"], x["procs"]),
               "encode_batch": lambda: run_encode_batch(p["corpus"], p["tok"]),
               "first_step": lambda: run_first_step(p["corpus"], p["tok"], p["cache"], p["out"])}[a.run]()
        print(json.dumps({**res, "cpu_s": cpu_seconds()}))
        return

    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="tokbench-"))
    try:
        t0 = time.time()
        corpus = make_corpus(work / "corpus", a.mb, public=a.public)
        print(f"corpus: {corpus['documents']:,} documents, {corpus['text_bytes'] / 2**20:.0f} MiB of text, "
              f"{corpus['disk_bytes'] / 2**20:.0f} MiB JSONL, made in {time.time() - t0:.0f}s", flush=True)
        from chatforge.data.sources import corpus_files, tokenizer_sample
        from chatforge.tokenizer import train_tokenizer

        train_tokenizer(tokenizer_sample(corpus_files([str(work / "corpus")]), 20_000_000), a.vocab).save(work / "tok")
        env = {**os.environ, "RAYON_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "true",
               "HF_HUB_OFFLINE": "1",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env.pop("CHATFORGE_CACHE", None)
        paths = {"corpus": str(work / "corpus"), "tok": str(work / "tok"), "cache": str(work / "cache"),
                 "work": str(work / "nanogpt"), "out": str(work / "run"), "procs": a.threads}
        rows, results = [], {"corpus": {**corpus, "text": "public" if a.public else "demo"}, "threads": a.threads, "vocab": a.vocab, "machine": machine_info()}
        methods = a.methods.split(",")
        cmd = lambda m, cpus=None: [sys.executable, __file__, "--run", m, "--args", json.dumps(paths),  # noqa: E731
                                    *(["--cpus", cpus] if cpus else [])]
        running = {}
        for i, m in enumerate(x for x in methods if x != "first_step"):
            cpus = ",".join(str(i * a.threads + k) for k in range(a.threads)) if a.parallel else None
            running[m] = Measured(cmd(m, cpus), env)
            if not a.parallel:
                running[m] = running[m].result()
        if "first_step" in methods:
            running["first_step"] = None
        for m in methods:
            if m == "first_step":
                res, wall, rss = Measured(cmd(m, "0" if a.parallel else None), env).result()
                results[m] = {**res, "process_s": wall, "peak_rss_mb": rss}
                print(f"first_step: run() to end of step 1 {res['run_to_first_step_s']:.2f}s (opening the cache "
                      f"{res['open_cache_s']:.3f}s), whole process {wall:.1f}s "
                      f"(imports {res['import_s']:.1f}s), peak RSS {rss:.0f} MiB", flush=True)
                continue
            r = running[m]
            res, wall, rss = r.result() if isinstance(r, Measured) else r
            cpu = res["cpu_s"]
            results[m] = {**res, "process_s": wall, "peak_rss_mb": rss}
            mbps = corpus["text_bytes"] / 2**20 / res["seconds"]
            results[m]["mb_per_s"] = mbps
            rows.append({"method": m, "MiB/s": f"{mbps:.2f}", "seconds": f"{res['seconds']:.1f}",
                         "tokens": f"{res['tokens']:,}", "peak RSS MiB": f"{rss:.0f}",
                         "MiB per CPU-s": f"{corpus['text_bytes'] / 2**20 / cpu:.2f}", "CPU s": f"{cpu:.1f}"})
            print(rows[-1], flush=True)
        if "encode_batch" in results:
            for r in rows:
                r["vs encode_batch"] = f"{results[r['method']]['mb_per_s'] / results['encode_batch']['mb_per_s']:.2f}"
                r["CPU vs encode_batch"] = f"{results['encode_batch']['cpu_s'] / results[r['method']]['cpu_s']:.2f}"
        print_table(rows, ["method", "MiB/s", "vs encode_batch", "seconds", "MiB per CPU-s", "CPU vs encode_batch",
                           "CPU s", "tokens", "peak RSS MiB"])
        if a.json:
            write_json(a.json, results)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
