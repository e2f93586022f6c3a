"""Generation speed: chatforge's Engine vs ``transformers``' ``generate``, with the machine's floor beside each.

Same weights (a randomly initialised native chatforge Llama saved as a Hugging Face directory, the one
the stage benchmarks use: ``small`` ~1.1M parameters, ``medium`` ~11.5M, 2,048-id vocabulary, context 256),
same prompts (the OpenAssistant user prompts of ``../shared/data/prompts`` rendered with the chat template,
those that leave room for the answer; their lengths differ, as in RL rollouts and serving), 64 new tokens
per row with no early stop, sampling at temperature 1 over the full distribution, KV cache on both sides,
fp32, CPU.

* ``engine-b1`` / ``engine-b16``: ``chatforge.engine.Engine.generate`` (1 or 16 prompts);
* ``hf-b1`` / ``hf-b16``: ``LlamaForCausalLM.generate`` (SDPA attention) on the left-padded batch.

Each call is timed whole (prefill + 64 decode steps); a call with one new token times the prefill alone, so
the table shows the prefill and the per-step decode time apart. Tokens/s counts new tokens only.

The floor. Before the loops the parent process measures this machine's memory bandwidth (summing a
512 MiB array) and matmul throughput (fp32 ``mm`` at the decode step's shapes and at a large square shape,
best of several). For a loop it prints, per new token, the least time the work can take:
``max(bytes read / bandwidth, FLOPs / matmul throughput)`` for the prefill (weights once, 2 x params x prompt
tokens) and for every decode step (all weights and the KV cache so far read once; 2 x params x rows plus the
attention FLOPs), summed over the call and divided by the new tokens. ``x floor`` is measured / floor.

    python benchmarks/generate_speed.py --threads 2            # both sizes, batch 1 and 16
    python benchmarks/generate_speed.py --sizes small --quick
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import trl_common as C  # noqa: E402

NEW = 64
BLOCK = 256
LOOPS = ["hf-b1", "engine-b1", "hf-b16", "engine-b16"]


def machine_floors(threads: int) -> dict:
    """Measured memory bandwidth (bytes/s) and fp32 matmul throughput (FLOP/s) of this process."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(128 * 1024 * 1024)  # 512 MiB, far beyond any cache
    best = min(_timed(lambda: x.sum()) for _ in range(5))
    bw = x.numel() * 4 / best
    from common import product_rate

    flops = {name: product_rate(*shape) * 1e9 for name, shape in {"large": (1024, 1024, 1024),
                                                                   "decode-b16": (16, 384, 1024)}.items()}
    return {"bandwidth": bw, "flops": max(flops.values()), "flops_by_shape": flops}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def floor_per_token(model_cfg: dict, params: int, lengths: list[int], floors: dict) -> float:
    """Least seconds per new token for one call (prefill of ``lengths`` + NEW decode steps), see the docstring."""
    L, d = model_cfg["n_layer"], model_cfg["n_embd"]
    B, P = len(lengths), max(lengths)
    bw, fl = floors["bandwidth"], floors["flops"]
    t = max(params * 4 / bw, 2 * params * sum(lengths) / fl)  # prefill: weights once, every real prompt token
    for step in range(NEW):
        S = P + step + 1  # keys/values read this step, per row
        kv_bytes = 2 * L * B * S * d * 4
        step_flops = 2 * params * B + 4 * L * B * S * d
        t += max((params * 4 + kv_bytes) / bw, step_flops / fl)
    return t / (B * NEW)


def gen_loop(kind: str, batch: int):
    def child(a) -> dict:
        import torch

        from chatforge.model.load import load_causal_lm
        from chatforge.tokenizer import render_prompt

        t0 = time.perf_counter()
        model, _, ctok = load_causal_lm(a.dirs["policy"], "cpu")
        prompts = [render_prompt(ctok, m) for m in C.prompt_messages(ctok, BLOCK, NEW)][:batch]
        params = sum(p.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(0)
        if kind == "engine":
            from chatforge.engine import Engine

            eng = Engine(model.eval())

            def run(n):
                eng.generate(prompts, n, temperature=1.0, stop_ids=[], pad_id=ctok.pad_id, generator=g)
        else:
            from transformers import AutoModelForCausalLM

            del model
            hf = AutoModelForCausalLM.from_pretrained(a.dirs["policy"], attn_implementation="sdpa",
                                                      dtype=torch.float32).eval()
            P = max(map(len, prompts))
            x = torch.tensor([[ctok.pad_id] * (P - len(p)) + p for p in prompts])  # (B, P) left-padded
            m = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])  # (B, P)

            def run(n):
                with torch.inference_mode():
                    hf.generate(input_ids=x, attention_mask=m, max_new_tokens=n, min_new_tokens=n, do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0, use_cache=True, pad_token_id=ctok.pad_id)
        setup = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(a.warmup):
            run(NEW)
        warm = time.perf_counter() - t1
        step_s, prefill_s = [], []
        for _ in range(max(a.steps, 3)):
            prefill_s.append(_timed(lambda: run(1)))
            step_s.append(_timed(lambda: run(NEW)))
        return {"step_s": step_s, "prefill_s": prefill_s, "warmup_s": warm, "setup_s": setup,
                "lengths": [len(p) for p in prompts], "params": params}
    return child


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def rows(size: str, res: dict, a) -> list[dict]:
    floors = a.floors
    out = []
    for name, r, _ in C.finished_loops(res, LOOPS):
        call, pre = median(r["step_s"]), median(r["prefill_s"])
        B = len(r["lengths"])
        floor = floor_per_token(C.SIZES[size], r["params"], r["lengths"], floors)
        out.append({"loop": name, "rows": B, "prompt tokens": sum(r["lengths"]), "tokens/s": B * NEW / call,
                    "ms/token": 1e3 * call / (B * NEW), "floor ms/token": 1e3 * floor,
                    "x floor": call / (B * NEW) / floor, "prefill ms": 1e3 * pre,
                    "decode ms/step": 1e3 * (call - pre) / (NEW - 1), "peak RSS MB": r["maxrss_mb"]})
    by = {row["loop"]: row for row in out}
    for row in out:
        peer = by.get(row["loop"].replace("engine", "hf"))
        row["vs hf"] = row["tokens/s"] / peer["tokens/s"] if peer and peer is not row else float("nan")
    return out


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--floors"]:  # in a process of its own: its 512 MiB array must not count in the loops' RSS
        print("FLOORS " + json.dumps(machine_floors(int(argv[1]))))
        return
    if "--child" not in argv:  # the parent measures the floors once, with the loops' thread count
        from common import cores

        threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 0
        out = subprocess.run([sys.executable, __file__, "--floors", str(threads or cores())], capture_output=True,
                             text=True, check=True).stdout
        floors = json.loads(out.split("FLOORS ", 1)[1])
        print(f"floors: memory bandwidth {floors['bandwidth'] / 1e9:.1f} GB/s, fp32 matmul "
              + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in floors["flops_by_shape"].items()) + " GFLOP/s")
    else:
        floors = {}

    def rows_with_floors(size, res, a):
        a.floors = floors
        return rows(size, res, a)

    C.harness(__doc__, __file__, {"engine-b1": gen_loop("engine", 1), "engine-b16": gen_loop("engine", 16),
                                  "hf-b1": gen_loop("hf", 1), "hf-b16": gen_loop("hf", 16)},
              LOOPS, rows_with_floors, {"warmup": 1, "steps": 5}, block_size=BLOCK)


if __name__ == "__main__":
    main()
