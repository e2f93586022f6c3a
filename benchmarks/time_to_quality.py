"""Time to quality: chatforge's speedrun preset against nanoGPT's README CPU run, on one or more texts.

For each corpus, the baseline (``benchmarks/peers/nanogpt_style.py``: nanoGPT's README CPU run, 4L/4H/128d,
context 64, batch 12, 2000 iterations) runs first, then chatforge's preset (``chatforge pretrain --config
configs/speedrun.yaml --data.path=CORPUS``), each as its own process, each timed from outside (Python start,
imports, data preparation, training, the final evaluation and, for chatforge, writing the model directory and
checkpoint all included). The baseline's final validation loss is the target; chatforge's time to quality is its
process wall time when its own final validation loss is <= the target (else "not reached"), and the ratio is
that time over the baseline's wall time.

Same symbols, same validation text: the baseline reads the corpus with ``--stream documents``, chatforge's
rule for a bytes-only vocabulary (``tokenizer.vocab_size: 0``): UTF-8 bytes, documents cut at
``<|endoftext|>`` (blank ones dropped), each preceded by one end-of-text id, the last 10% of that stream held
out (``data.val_split: tail``). Both losses are therefore nats per byte-token over the same validation bytes,
every non-overlapping context window of the split (on ASCII text, such as Tiny Shakespeare, a byte is a
character). Only ``--data.path`` changes between corpora: the preset is the same.

Each chatforge run gets a fresh, empty token cache (``CHATFORGE_CACHE`` in a temporary folder), so
tokenizing the corpus is inside its time, as on a user's first run.

    python benchmarks/time_to_quality.py --threads 2 \\
        --data ../shared/data/tinyshakespeare.txt ../shared/data/pretrain/tinystories_sample.txt

On a small text (the 3.8 KB TinyStories sample: 3,360 training tokens) the baseline's 2000 iterations
(1.5M tokens, ~460 epochs) overfit: its validation loss at the end is higher than at its best. The target is
still its end loss: the loss nanoGPT's run ends at, whatever that is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # `python benchmarks/time_to_quality.py`: import benchmarks.* from the repository
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, machine_info, print_table, write_json  # noqa: E402

BASELINE = ROOT / "benchmarks" / "peers" / "nanogpt_style.py"
DEFAULT_CONFIG = "configs/speedrun.yaml"


def load_avg() -> str:
    """The 1/5/15-minute load averages, as uptime prints them."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's finished children."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[float, float]:
    """Run ``cmd`` (output to ``log``); (wall seconds measured from outside, its CPU seconds). Raises on failure.

    CPU seconds are a second view on a busy machine, where wall time depends on the other jobs: with as many
    threads as free cores the two are close; spinning threads of a crowded machine add to both."""
    t0, c0 = time.perf_counter(), children_cpu_s()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - c0
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; its output ends with:\n{tail}")
    return wall, cpu


def baseline_result(path: Path) -> dict:
    """The baseline's --json: its final full-split validation loss and phase times."""
    d = json.loads(Path(path).read_text())
    if not isinstance(d.get("val_loss"), (int, float)) or not math.isfinite(d["val_loss"]):
        raise ValueError(f"{path}: no finite val_loss in the baseline's results")
    return {"val_loss": float(d["val_loss"]), "train_s": d.get("train_s"), "eval_s": d.get("eval_s"),
            "run_s": d.get("wall_s"), "val_tokens": d.get("val_tokens")}


def chatforge_result(run_dir: Path) -> dict:
    """The final full-split validation loss of a chatforge pretraining run and where its time went (from the
    run directory's chatforge.json and metrics.jsonl)."""
    info = json.loads((Path(run_dir) / "chatforge.json").read_text())
    m = info.get("metrics", {})
    if not isinstance(m.get("eval_val_loss"), (int, float)):
        raise ValueError(f"{run_dir}/chatforge.json: no eval_val_loss in its metrics (was there an evaluation?)")
    eval_s = 0.0
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            row = json.loads(line)
            if row.get("kind") == "eval":
                eval_s += float(row.get("eval_s", 0.0))
    return {"val_loss": float(m["eval_val_loss"]), "train_s": m.get("train_elapsed_s"), "eval_s": eval_s,
            "run_s": info.get("wall_s"), "steps": m.get("steps"), "val_tokens": info.get("data", {}).get("val_tokens")}


def verdict(base_wall: float, target: float, cf_wall: float, cf_loss: float) -> dict:
    """The time-to-quality rule: chatforge reaches the target when its final loss is <= the baseline's final
    loss; its time is then its wall time (else infinite), and the ratio is that over the baseline's wall."""
    reached = cf_loss <= target
    tt = cf_wall if reached else math.inf
    return {"target": target, "reached": reached, "time_to_target_s": tt, "ratio": tt / base_wall}


def run_corpus(data: str, config: str, threads: int, work: Path, timeout: float, tag: str) -> dict:
    """One baseline run and one chatforge run on ``data``; the row of the results table."""
    name = Path(data).name
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    base_json = work / f"{tag}_baseline.json"
    load_b = load_avg()
    base_wall, base_cpu = timed([sys.executable, str(BASELINE), "--data", data, "--stream", "documents",
                       "--threads", str(threads), "--json", str(base_json)], env, work / f"{tag}_baseline.log", timeout)
    base = baseline_result(base_json)
    run_dir, cache = work / f"{tag}_chatforge", work / f"{tag}_cache"
    load_c = load_avg()
    cf_wall, cf_cpu = timed([sys.executable, "-m", "chatforge", "pretrain", "--config", config, "--out", str(run_dir),
                     f"--data.path={data}", f"--train.threads={threads}", "--train.progress=false"],
                    {**env, "CHATFORGE_CACHE": str(cache)}, work / f"{tag}_chatforge.log", timeout)
    cf = chatforge_result(run_dir)
    v = verdict(base_wall, base["val_loss"], cf_wall, cf["val_loss"])
    if base.get("val_tokens") != cf.get("val_tokens"):
        print(f"warning: {name}: validation split sizes differ (baseline {base.get('val_tokens')}, "
              f"chatforge {cf.get('val_tokens')})")
    return {"corpus": name, "baseline_wall_s": base_wall, "baseline_val": base["val_loss"],
            "baseline_train_s": base["train_s"], "baseline_load": load_b,
            "chatforge_wall_s": cf_wall, "chatforge_val": cf["val_loss"], "chatforge_train_s": cf["train_s"],
            "chatforge_eval_s": cf["eval_s"], "chatforge_startup_s": cf_wall - (cf["run_s"] or cf_wall),
            "chatforge_setup_save_s": (cf["run_s"] or 0) - (cf["train_s"] or 0) - cf["eval_s"],
            "chatforge_load": load_c, **v, "load_after": load_avg(), "baseline_cpu_s": base_cpu,
            "chatforge_cpu_s": cf_cpu, "cpu_ratio": cf_cpu / base_cpu if v["reached"] and base_cpu else math.inf}


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=[str(ROOT.parent / "shared/data/tinyshakespeare.txt"),
                                                 str(ROOT.parent / "shared/data/pretrain/tinystories_sample.txt")],
                   help="one or more corpora (text files)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="chatforge's preset (the same for every corpus)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of both loops")
    p.add_argument("--repeats", type=int, default=1, help="baseline/chatforge pairs per corpus")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to one process")
    p.add_argument("--keep", default=None, help="keep the runs and logs in this folder (default: a temporary one)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ttq_") as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for r in range(a.repeats):
            for i, data in enumerate(a.data):
                row = run_corpus(str(Path(data).resolve()), a.config, a.threads, work, a.timeout, f"r{r}_c{i}")
                rows.append({"repeat": r, **row})
                print(f"{row['corpus']}: baseline {row['baseline_wall_s']:.1f}s val {row['baseline_val']:.4f} "
                      f"(load {row['baseline_load']}); chatforge {row['chatforge_wall_s']:.1f}s val "
                      f"{row['chatforge_val']:.4f} (load {row['chatforge_load']}); ratio {row['ratio']:.3f}", flush=True)
    print_table([{**r, "reached": "yes" if r["reached"] else "NO"} for r in rows],
                ["repeat", "corpus", "baseline_val", "baseline_wall_s", "chatforge_val", "chatforge_wall_s",
                 "chatforge_train_s", "chatforge_startup_s", "chatforge_setup_save_s", "chatforge_eval_s",
                 "reached", "ratio", "baseline_cpu_s", "chatforge_cpu_s", "cpu_ratio", "baseline_load",
                 "chatforge_load"],
                title=f"time to the baseline's final val loss ({a.config}, {a.threads} threads)")
    write_json(a.json, {"machine": machine_info(), "args": vars(a), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
