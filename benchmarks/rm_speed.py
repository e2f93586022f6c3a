"""Reward-model throughput: chatforge's rm stage vs TRL's RewardTrainer, same pairs, same batch, same weights.

Data: ../shared/data/preference/hh_rlhf_harmless_base_test.jsonl.gz read by chatforge's reader
(``strict=False``: its 9 flawed records are skipped), pairs longer than the context (256) dropped on
both sides (the same pairs go to TRL as a conversational ``{prompt, chosen, rejected}`` dataset).
Batch 12 pairs (24 sequences), Bradley-Terry loss, AdamW, fp32, CPU. Both start from the same
``LlamaForSequenceClassification`` weights (the trunk of the policy; chatforge builds its head from
the policy directory with the same initialisation law).

* ``chatforge``: ``chatforge.stages.rm.run`` (chosen and rejected in one forward, length-bucketed);
* ``trl``: ``trl.RewardTrainer`` (its default collator: padding to the longest of the batch).

Prints pairs/s of each and chatforge / TRL. ``rm.norm_samples=64`` (the reward statistics after
training are part of the set-up/save time, not of pairs/s).

    .venv-bench/bin/python benchmarks/rm_speed.py
    .venv-bench/bin/python benchmarks/rm_speed.py --quick
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import trl_common as C  # noqa: E402

BATCH = 12
BLOCK = 256


def add_args(p) -> None:
    p.add_argument("--max-pairs", dest="x_max_pairs", type=int, default=0,
                   help="use the first N readable pairs (0 = all; --quick: 120)")


def child_chatforge(a) -> dict:
    r = C.run_chatforge_stage("rm", [f"model.init={a.dirs['policy']}", f"data.path=[{C.PREF_DATA}]",
                                     "data.strict=false", f"data.max_examples={a.x_max_pairs}",
                                     f"train.batch_size={BATCH}", f"train.max_steps={a.warmup + a.steps}",
                                     "rm.norm_samples=64"], a.warmup, a.threads)
    r.pop("rows")
    return {**r, "pairs": BATCH * len(r["step_s"])}


def child_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from chatforge.model.load import load_tokenizer

    t0 = time.perf_counter()
    records, dropped = C.preference_records(load_tokenizer(a.dirs["policy"]), BLOCK, a.x_max_pairs)
    ds = Dataset.from_list(records)
    tok = C.load_hf_tokenizer(a.dirs["policy"])
    model = AutoModelForSequenceClassification.from_pretrained(a.dirs["rm"], num_labels=1, attn_implementation="sdpa",
                                                               dtype=torch.float32)
    timer = C.timing_callback()
    with tempfile.TemporaryDirectory() as out:
        args = C.trl_args(RewardConfig, out, BATCH, a.warmup + a.steps, max_length=BLOCK)
        trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
        r = C.train_timed(trainer, timer, t0, a.warmup)
    return {**r, "pairs": BATCH * len(r["step_s"]), "train_pairs": len(records), "dropped_overlong": dropped}


def rows(size: str, res: dict, a) -> list[dict]:
    out, ref = [], None
    for name, r, t in C.finished_loops(res, ("trl", "chatforge")):
        out.append({"loop": name, "pairs/s": r["pairs"] / t, "s/step": t / len(r["step_s"]),
                    "warmup_s": r["warmup_s"], "set-up s": r["setup_s"], "peak RSS MB": r["maxrss_mb"]})
        ref = r["pairs"] / t if name == "trl" else ref
    for row in out:
        row["vs TRL"] = row["pairs/s"] / ref if ref else float("nan")
    return out


if __name__ == "__main__":
    C.harness(__doc__, __file__, {"chatforge": child_chatforge, "trl": child_trl}, ["trl", "chatforge"], rows,
              {"warmup": 3, "steps": 20}, add_args=add_args, block_size=BLOCK)
