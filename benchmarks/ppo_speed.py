"""PPO-RLHF step time, rollout speed and peak memory: chatforge's ppo stage vs TRL 1.12's PPO trainer
(generation alone, ``transformers`` generate vs chatforge's Engine: benchmarks/generate_speed.py).

Same prompts (../shared/data/prompts/oasst_prompt_lottery_en_250_text.jsonl, user messages that fit
the context), same starting weights: policy and reference = the policy directory, reward model and
value model (critic) = the RM directory (``LlamaForSequenceClassification`` on the policy's trunk;
chatforge also initialises its critic from the RM). One step: 8 prompts x up to 32 new tokens,
temperature 1 with the full distribution (top-k/top-p off), KL coefficient 0.05 (k1), GAE
gamma 1 / lambda 0.95, whitened advantages, value coefficient 0.1, one minibatch, K PPO epochs
(K = 4 and K = 1), fp32, CPU.

* ``chatforge-4ep`` / ``chatforge-1ep``: ``chatforge.stages.ppo.run`` (rollouts through the Engine);
* ``trl-4ep`` / ``trl-1ep``: ``trl.experimental.ppo.PPOTrainer`` (TRL 1.12; removed in 1.13) with a
  pre-tokenised, left-padded prompt dataset, ``stop_token="eos"`` mapped to ``<|end|>``.

Prints s/step, rollout tokens/s and peak RSS (each loop in its own process) and the ratios
(targets: step time <= 0.5x TRL, peak RSS <= TRL), and where a step's
time goes: chatforge's per-phase seconds from its metrics rows (chatforge/rl/timing.py: gen, logp, ref,
reward, value, update); TRL's generate time and its no-grad old-logp/ref/value/reward forwards (wrapped
``forward``/``generate``, peers/trl_common.py), its update inside the rest.

    .venv-bench/bin/python benchmarks/ppo_speed.py
    .venv-bench/bin/python benchmarks/ppo_speed.py --quick
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import trl_common as C  # noqa: E402

PROMPTS, NEW = 8, 32
BLOCK = 256
LOOPS = ["trl-4ep", "chatforge-4ep", "trl-1ep", "chatforge-1ep"]


def chatforge_loop(epochs: int):
    def child(a) -> dict:
        r = C.run_chatforge_stage("ppo", [f"model.init={a.dirs['policy']}", f"data.path=[{C.PROMPT_DATA}]",
                                          "data.strict=false", f"rl.reward_model={a.dirs['rm']}",
                                          f"rl.prompts_per_step={PROMPTS}", f"rl.max_new_tokens={NEW}",
                                          "rl.temperature=1.0", f"rl.ppo_epochs={epochs}", "rl.minibatches=1",
                                          "rl.kl_coef=0.05", "rl.kl_estimator=k1", "rl.vf_coef=0.1",
                                          "rl.sample_every=0", f"train.batch_size={PROMPTS}",
                                          f"train.max_steps={a.warmup + a.steps}"], a.warmup, a.threads)
        rows = r.pop("rows")
        return {**r, "gen_tokens": sum(x["tokens"] for x in rows), "gen_s": sum(x["gen_s"] for x in rows),
                **C.chatforge_phases(rows)}
    return child


def trl_loop(epochs: int):
    def child(a) -> dict:
        import torch
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from trl.experimental.ppo import PPOConfig, PPOTrainer

        from chatforge.model.load import load_tokenizer
        from chatforge.tokenizer import render_prompt

        t0 = time.perf_counter()
        ctok = load_tokenizer(a.dirs["policy"])
        ids = [render_prompt(ctok, m) for m in C.prompt_messages(ctok, BLOCK, NEW)]  # the chat template's ids
        ds = Dataset.from_list([{"input_ids": x} for x in ids])
        tok = C.load_hf_tokenizer(a.dirs["policy"])
        tok.padding_side = "left"
        tok.eos_token = "<|end|>"  # TRL's stop_token="eos" = the end-of-turn token, as chatforge stops

        def lm():
            return AutoModelForCausalLM.from_pretrained(a.dirs["policy"], attn_implementation="sdpa",
                                                        dtype=torch.float32)

        def scalar():
            return AutoModelForSequenceClassification.from_pretrained(a.dirs["rm"], num_labels=1, dtype=torch.float32)

        policy, ref, reward, value = lm(), lm(), scalar(), scalar()
        gen = C.GenerateTimer(policy)
        # TRL's rollout: old log-probs from generate's scores, then ref, value and reward forwards (no grad)
        passes = C.PassTimer({"logp": policy, "ref": ref, "value": value.model, "reward": reward.model}, gen)
        timer = C.timing_callback()
        steps = a.warmup + a.steps
        with tempfile.TemporaryDirectory() as out:
            args = C.trl_args(PPOConfig, out, PROMPTS, steps, total_episodes=PROMPTS * steps, num_ppo_epochs=epochs,
                              num_mini_batches=1, gradient_accumulation_steps=1, response_length=NEW,
                              temperature=1.0, kl_coef=0.05, kl_estimator="k1", vf_coef=0.1, stop_token="eos",
                              local_rollout_forward_batch_size=PROMPTS, num_sample_generations=0)
            trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                                 value_model=value, train_dataset=ds, callbacks=[timer])
            r = C.train_timed(trainer, timer, t0, a.warmup)
        return {**r, **gen.after(a.warmup), **C.trl_phases(timer, gen, passes, a.warmup)}
    return child


def rows(size: str, res: dict, a) -> list[dict]:
    out = []
    for name, r, t in C.finished_loops(res, LOOPS):
        out.append({"loop": name, "s/step (or /call)": t / len(r["step_s"]),
                    "rollout tokens/s": r["gen_tokens"] / r["gen_s"] if r.get("gen_s") else float("nan"),
                    "warmup_s": r["warmup_s"], "set-up s": r["setup_s"], "peak RSS MB": r["maxrss_mb"]})
    by = {row["loop"]: row for row in out}
    for row in out:
        name = row["loop"]
        peer = name.replace("chatforge", "trl")
        p = by.get(peer)
        ok = p is not None and peer != name
        row["time vs peer"] = row["s/step (or /call)"] / p["s/step (or /call)"] if ok else float("nan")
        row["tokens/s vs peer"] = row["rollout tokens/s"] / p["rollout tokens/s"] if ok else float("nan")
        row["RSS vs peer"] = row["peak RSS MB"] / p["peak RSS MB"] if ok else float("nan")
    C.print_phases(res, LOOPS[:4], f"size {size}: where a PPO step's time goes")
    return out


if __name__ == "__main__":
    C.harness(__doc__, __file__, {"chatforge-4ep": chatforge_loop(4), "chatforge-1ep": chatforge_loop(1),
                                  "trl-4ep": trl_loop(4), "trl-1ep": trl_loop(1)},
              LOOPS, rows, {"warmup": 2, "steps": 8}, block_size=BLOCK)
