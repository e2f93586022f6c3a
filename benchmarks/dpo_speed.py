"""DPO throughput: chatforge's dpo stage vs TRL's DPOTrainer, reference log-probs on the fly and precomputed.

Data: ../shared/data/preference/hh_rlhf_harmless_base_test.jsonl.gz (chatforge's reader,
``strict=False``), pairs longer than the context (256) dropped on both sides; the same pairs go to
TRL as a conversational ``{prompt, chosen, rejected}`` dataset. Batch 12 pairs, sigmoid loss,
beta 0.1, AdamW, fp32, CPU, the same starting weights (policy and reference) on both sides.

* ``chatforge`` / ``chatforge-precomputed``: ``chatforge.stages.dpo.run`` with
  ``dpo.precompute_ref=false/true`` (chosen and rejected in one forward);
* ``trl`` / ``trl-precomputed``: ``trl.DPOTrainer`` (reference = a frozen copy made by TRL) with
  ``precompute_ref_log_probs=False/True``.

Precomputing the reference log-probs (over all training pairs) is set-up on both sides, reported in
``set-up s``, not in pairs/s. Ratios: each chatforge loop against the TRL loop of the same mode.

    .venv-bench/bin/python benchmarks/dpo_speed.py
    .venv-bench/bin/python benchmarks/dpo_speed.py --quick
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
LOOPS = ["trl", "chatforge", "trl-precomputed", "chatforge-precomputed"]


def add_args(p) -> None:
    p.add_argument("--max-pairs", dest="x_max_pairs", type=int, default=0,
                   help="use the first N readable pairs (0 = all; --quick: 120)")


def chatforge_loop(precompute: bool):
    def child(a) -> dict:
        r = C.run_chatforge_stage("dpo", [f"model.init={a.dirs['policy']}", f"data.path=[{C.PREF_DATA}]",
                                          "data.strict=false", f"data.max_examples={a.x_max_pairs}",
                                          f"train.batch_size={BATCH}", f"train.max_steps={a.warmup + a.steps}",
                                          "dpo.beta=0.1", "dpo.loss=sigmoid", f"dpo.precompute_ref={precompute}"],
                                  a.warmup, a.threads)
        r.pop("rows")
        return {**r, "pairs": BATCH * len(r["step_s"])}
    return child


def trl_loop(precompute: bool):
    def child(a) -> dict:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM
        from trl import DPOConfig, DPOTrainer

        from chatforge.model.load import load_tokenizer

        t0 = time.perf_counter()
        records, dropped = C.preference_records(load_tokenizer(a.dirs["policy"]), BLOCK, a.x_max_pairs)
        ds = Dataset.from_list(records)
        tok = C.load_hf_tokenizer(a.dirs["policy"])
        model = AutoModelForCausalLM.from_pretrained(a.dirs["policy"], attn_implementation="sdpa", dtype=torch.float32)
        timer = C.timing_callback()
        with tempfile.TemporaryDirectory() as out:
            args = C.trl_args(DPOConfig, out, BATCH, a.warmup + a.steps, max_length=BLOCK, beta=0.1,
                              loss_type="sigmoid", precompute_ref_log_probs=precompute)
            trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
            r = C.train_timed(trainer, timer, t0, a.warmup)
        return {**r, "pairs": BATCH * len(r["step_s"]), "train_pairs": len(records), "dropped_overlong": dropped}
    return child


def rows(size: str, res: dict, a) -> list[dict]:
    out = []
    for name, r, t in C.finished_loops(res, LOOPS):
        out.append({"loop": name, "pairs/s": r["pairs"] / t, "s/step": t / len(r["step_s"]),
                    "warmup_s": r["warmup_s"], "set-up s": r["setup_s"], "peak RSS MB": r["maxrss_mb"]})
    by = {row["loop"]: row["pairs/s"] for row in out}
    for row in out:
        peer = row["loop"].replace("chatforge", "trl")
        row["vs TRL (same mode)"] = row["pairs/s"] / by[peer] if peer in by else float("nan")
    return out


if __name__ == "__main__":
    C.harness(__doc__, __file__, {"chatforge": chatforge_loop(False), "chatforge-precomputed": chatforge_loop(True),
                                  "trl": trl_loop(False), "trl-precomputed": trl_loop(True)}, LOOPS, rows,
              {"warmup": 3, "steps": 20}, add_args=add_args, block_size=BLOCK)
