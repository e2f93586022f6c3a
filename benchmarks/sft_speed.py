"""SFT throughput: chatforge's sft stage vs TRL's SFTTrainer, same data, same batch, same weights.

Data: ../shared/data/sft/alpaca_en_demo.json (read by chatforge's reader; the same messages go to
TRL as a conversational ``{"messages"}`` dataset), context 256 (longer conversations truncated on
both sides), loss on assistant tokens only on both sides (TRL: ``assistant_only_loss=True`` through
the saved chat template's ``{% generation %}`` marks). Batch 12 conversations, AdamW, fp32, CPU.

* ``chatforge``: ``chatforge.stages.sft.run`` (length-bucketed batches, the one Trainer);
* ``trl``: ``trl.SFTTrainer`` on ``LlamaForCausalLM`` loaded from the same directory (padding to the
  longest in the batch, TRL's default collator).

Prints examples/s and tokens/s (non-padding tokens) of each and chatforge / TRL. Run with the
benchmark environment (``bash benchmarks/make_bench_env.sh``):

    .venv-bench/bin/python benchmarks/sft_speed.py                 # both sizes
    .venv-bench/bin/python benchmarks/sft_speed.py --quick         # smoke run (small, 1 + 2 steps)
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


def child_chatforge(a) -> dict:
    r = C.run_chatforge_stage("sft", [f"model.init={a.dirs['policy']}", f"data.path=[{C.SFT_DATA}]",
                                      f"train.batch_size={BATCH}", f"train.max_steps={a.warmup + a.steps}",
                                      "sft.n_eval_prompts=0", "data.overlong=truncate", "data.strict=false"],
                              a.warmup, a.threads)
    tokens = sum(x.get("tokens", 0) for x in r.pop("rows"))
    return {**r, "examples": BATCH * len(r["step_s"]), "tokens": tokens}


def child_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    t0 = time.perf_counter()
    ds = Dataset.from_list([{"messages": m} for m in C.sft_messages()])
    tok = C.load_hf_tokenizer(a.dirs["policy"])
    model = AutoModelForCausalLM.from_pretrained(a.dirs["policy"], attn_implementation="sdpa", dtype=torch.float32)
    timer = C.timing_callback()
    with tempfile.TemporaryDirectory() as out:
        args = C.trl_args(SFTConfig, out, BATCH, a.warmup + a.steps, max_length=BLOCK, assistant_only_loss=True,
                          packing=False, include_num_input_tokens_seen="non_padding")
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
        r = C.train_timed(trainer, timer, t0, a.warmup)
    return {**r, "examples": BATCH * len(r["step_s"])}


def rows(size: str, res: dict, a) -> list[dict]:
    out = []
    ref = None
    for name, r, t in C.finished_loops(res, ("trl", "chatforge")):
        ex_s = r["examples"] / t
        out.append({"loop": name, "examples/s": ex_s, "tokens/s": (r.get("tokens") or 0) / t or float("nan"),
                    "s/step": t / len(r["step_s"]), "warmup_s": r["warmup_s"], "set-up s": r["setup_s"],
                    "peak RSS MB": r["maxrss_mb"]})
        ref = ex_s if name == "trl" else ref
    for row in out:
        row["vs TRL"] = row["examples/s"] / ref if ref else float("nan")
    return out


if __name__ == "__main__":
    C.harness(__doc__, __file__, {"chatforge": child_chatforge, "trl": child_trl}, ["trl", "chatforge"], rows,
              {"warmup": 3, "steps": 20}, block_size=BLOCK)
