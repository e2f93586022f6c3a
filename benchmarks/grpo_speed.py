"""Critic-free RL step time: chatforge's grpo stage (GRPO and RLOO) vs TRL's GRPOTrainer and RLOOTrainer.

Same prompts (../shared/data/prompts/oasst_prompt_lottery_en_250_text.jsonl, user messages that fit
the context), same policy weights, same reward model (a ``LlamaForSequenceClassification`` on the
policy's trunk, read by both sides), and the same step: 8 prompts x 4 samples x up to 32 new tokens,
temperature 1 with the full distribution, one update epoch over the 32 completions in one batch,
no KL term (TRL's GRPO default ``beta=0``; RLOO run with ``beta=0`` too), fp32, CPU.

* ``chatforge-grpo`` / ``chatforge-rloo``: ``chatforge.stages.grpo.run`` with ``rl.algo=grpo|rloo``
  (rollouts through chatforge's Engine with its KV cache);
* ``trl-grpo`` / ``trl-rloo``: ``trl.GRPOTrainer`` / ``trl.RLOOTrainer`` (``transformers`` generate).

Prints seconds per step, rollout tokens/s (generated tokens / time in generation), peak RSS of each
run (own process) and chatforge / TRL step-time ratios (target <= 0.5), and where a step's time goes
(chatforge's per-phase seconds from its metrics rows; TRL's generate time and its no-grad policy and
reward forwards, its update inside the rest). With random weights the responses rarely end early, so
both sides generate ~32 tokens per completion.

    .venv-bench/bin/python benchmarks/grpo_speed.py
    .venv-bench/bin/python benchmarks/grpo_speed.py --quick
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import trl_common as C  # noqa: E402

PROMPTS, GROUP, NEW = 8, 4, 32
BLOCK = 256
LOOPS = ["trl-grpo", "chatforge-grpo", "trl-rloo", "chatforge-rloo"]


def chatforge_loop(algo: str):
    def child(a) -> dict:
        r = C.run_chatforge_stage("grpo", [f"model.init={a.dirs['policy']}", f"data.path=[{C.PROMPT_DATA}]",
                                           "data.strict=false", f"rl.algo={algo}", f"rl.reward_model={a.dirs['rm']}",
                                           f"rl.prompts_per_step={PROMPTS}", f"rl.group_size={GROUP}",
                                           f"rl.max_new_tokens={NEW}", "rl.temperature=1.0", "rl.ppo_epochs=1",
                                           "rl.minibatches=1", "rl.grpo_kl_coef=0.0", "rl.sample_every=0",
                                           f"train.batch_size={PROMPTS * GROUP}",
                                           f"train.max_steps={a.warmup + a.steps}"], a.warmup, a.threads)
        rows = r.pop("rows")
        return {**r, "gen_tokens": sum(x["tokens"] for x in rows), "gen_s": sum(x["gen_s"] for x in rows),
                **C.chatforge_phases(rows)}
    return child


def trl_loop(algo: str):
    def child(a) -> dict:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from chatforge.model.load import load_tokenizer

        if algo == "grpo":
            from trl import GRPOConfig as Config
            from trl import GRPOTrainer as Trainer
        else:
            from trl import RLOOConfig as Config
            from trl import RLOOTrainer as Trainer
        t0 = time.perf_counter()
        prompts = C.prompt_messages(load_tokenizer(a.dirs["policy"]), BLOCK, NEW)
        ds = Dataset.from_list([{"prompt": m} for m in prompts])
        tok = C.load_hf_tokenizer(a.dirs["policy"])
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(a.dirs["policy"], attn_implementation="sdpa", dtype=torch.float32)
        rm = AutoModelForSequenceClassification.from_pretrained(a.dirs["rm"], num_labels=1, dtype=torch.float32)
        gen = C.GenerateTimer(model)
        passes = C.PassTimer({"logp": model, "reward": rm}, gen)  # no-grad forwards outside generate
        timer = C.timing_callback()
        with tempfile.TemporaryDirectory() as out:
            args = C.trl_args(Config, out, PROMPTS * GROUP, a.warmup + a.steps, num_generations=GROUP,
                              max_completion_length=NEW, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
                              num_iterations=1, gradient_accumulation_steps=1)
            trainer = Trainer(model=model, reward_funcs=rm, args=args, train_dataset=ds, processing_class=tok,
                              reward_processing_classes=tok, callbacks=[timer])
            r = C.train_timed(trainer, timer, t0, a.warmup)
        return {**r, **gen.after(a.warmup), **C.trl_phases(timer, gen, passes, a.warmup)}
    return child


def rows(size: str, res: dict, a) -> list[dict]:
    out = []
    for name, r, t in C.finished_loops(res, LOOPS):
        out.append({"loop": name, "s/step": t / len(r["step_s"]),
                    "rollout tokens/s": r["gen_tokens"] / r["gen_s"] if r.get("gen_s") else float("nan"),
                    "warmup_s": r["warmup_s"], "set-up s": r["setup_s"], "peak RSS MB": r["maxrss_mb"]})
    by = {row["loop"]: row["s/step"] for row in out}
    for row in out:
        peer = row["loop"].replace("chatforge", "trl")
        row["step time vs TRL"] = row["s/step"] / by[peer] if peer in by else float("nan")
    C.print_phases(res, LOOPS, f"size {size}: where a GRPO/RLOO step's time goes")
    return out


if __name__ == "__main__":
    C.harness(__doc__, __file__, {"chatforge-grpo": chatforge_loop("grpo"), "chatforge-rloo": chatforge_loop("rloo"),
                                  "trl-grpo": trl_loop("grpo"), "trl-rloo": trl_loop("rloo")}, LOOPS, rows,
              {"warmup": 2, "steps": 8}, block_size=BLOCK)
