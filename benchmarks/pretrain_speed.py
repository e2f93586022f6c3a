"""Pretraining throughput at equal shape: chatforge's Trainer vs a nanoGPT-style loop vs transformers' Llama.

One run, one machine, a fixed CPU thread count (one per core). For each shape it times, on the same
random token stream and the same batch:

* ``chatforge[...]``: the real training machinery: ``chatforge.trainer.Trainer`` (its AdamW,
  autocast and ``torch.compile`` settings) driving the pretraining stage's step function over a
  ``TokenLoader``, with the native ``chatforge.model.gpt.GPT``; one row per setting
  (fp32/bf16 autocast x eager/compiled x fused/foreach AdamW);
* ``nanogpt-style``: ``benchmarks/peers/nanogpt_style.py`` (GPT-2: learned positions, LayerNorm,
  4x GELU MLP, causal SDPA), fp32 eager, AdamW, clipping: the reference (ratio 1.00);
* ``hf-llama``: ``transformers.LlamaForCausalLM`` (SDPA attention) in a plain fp32 eager loop.

Warmup steps (and so compilation) are excluded from tokens/s and reported apart as ``warmup_s``.

    python benchmarks/pretrain_speed.py                    # both shapes, every variant
    python benchmarks/pretrain_speed.py --shapes small --variants fp32-compile --steps 30
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import machine_info, print_table, set_threads, time_steps, write_json  # noqa: E402  (adds the repo root to sys.path)

from benchmarks.peers import nanogpt_style as ng
from chatforge import distributed as D
from chatforge import losses
from chatforge.config import load_config
from chatforge.data.pretrain import TokenLoader
from chatforge.model.gpt import GPT, mlp_hidden_size
from chatforge.trainer import Trainer

VOCAB = 262  # chatforge's bytes-only vocabulary (256 bytes + 6 special tokens), used by every loop

SHAPES = {
    # nanoGPT's README CPU run (0.8M parameters)
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, warmup=15, steps=60),
    # ~11M parameters
    "medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8, warmup=4, steps=12),
}

# chatforge settings: (train.dtype, train.compile, optim.fused)
VARIANTS = {
    "fp32-eager": ("fp32", False, True),
    "fp32-eager-foreach": ("fp32", False, False),
    "fp32-compile": ("fp32", True, True),
    "bf16-eager": ("bf16", False, True),
    "bf16-compile": ("bf16", True, True),
}


def token_stream(n: int = 400_000, seed: int = 0) -> np.ndarray:
    """A fixed random byte-token stream (speed does not depend on the text)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint16)


def bench_chatforge(shape: dict, variant: str, tokens: np.ndarray, warmup: int, steps: int):
    """Time the Trainer + the pretraining stage's step function (a copy of stages/pretrain.py's step_fn)."""
    dtype, compile_, fused = VARIANTS[variant]
    T, B = shape["block_size"], shape["batch_size"]
    cfg = load_config("pretrain", None, [
        f"model.n_layer={shape['n_layer']}", f"model.n_head={shape['n_head']}", f"model.n_embd={shape['n_embd']}",
        f"model.block_size={T}", f"train.batch_size={B}", f"train.dtype={dtype}", f"train.compile={compile_}",
        f"optim.fused={fused}", f"train.max_steps={warmup + steps}", "train.eval_every=0", "train.ckpt_every=0",
        "train.log_every=1000000", "train.progress=false", "optim.warmup_steps=10",
    ])
    info = D.init(cfg.dist, "cpu")
    torch.manual_seed(0)
    model = GPT(cfg.model, VOCAB)
    loader = TokenLoader(tokens, T, B, seed=0)
    stamps: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out, {"model": model}, info, state={"data": loader},
                          flops_per_token=model.flops_per_token())
        net, step_tokens = trainer.models["model"], B * T

        def micro_step(xy):  # == stages/pretrain.py micro_step
            x, y = xy
            loss_sum, _ = losses.lm_loss(net(x), y)
            return loss_sum, y.numel(), {}

        def step_fn(step: int) -> dict:  # == stages/pretrain.py step_fn with grad_accum 1, world 1
            stamps.append(time.perf_counter())
            res = trainer.accumulate(loader.next(1), micro_step)
            return {"loss": res.pop("loss"), "tokens": res.pop("count"), **res}

        t0 = time.perf_counter()
        trainer.fit(step_fn)
        stamps.append(time.perf_counter())
    # step i lasted stamps[i+1] - stamps[i] (trainer overhead included); the last step ends at the
    # final stamp taken after fit, which includes the final checkpoint, so drop it
    diffs = [b - a for a, b in zip(stamps[:-1], stamps[1:])][:-1]
    from common import Timing

    t = Timing(f"chatforge[{variant}]", B * T, warmup_s=stamps[warmup] - t0, step_s=diffs[warmup:])
    t.extra["params"] = model.num_params()
    return t


def bench_nanogpt(shape: dict, tokens: np.ndarray, warmup: int, steps: int):
    cfg = ng.GPTConfig(block_size=shape["block_size"], vocab_size=VOCAB, n_layer=shape["n_layer"],
                       n_head=shape["n_head"], n_embd=shape["n_embd"])
    torch.manual_seed(0)
    model = ng.GPT(cfg)
    opt = ng.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.99), "cpu")
    gen = torch.Generator().manual_seed(0)
    step = ng.make_step(model, opt, lambda: ng.get_batch(tokens, cfg.block_size, shape["batch_size"], gen))
    t = time_steps("nanogpt-style[fp32-eager]", lambda: step().item(), shape["batch_size"] * cfg.block_size, warmup, steps)
    t.extra["params"] = model.num_params()
    return t


def bench_hf_llama(shape: dict, tokens: np.ndarray, warmup: int, steps: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.config import ModelConfig

    mc = ModelConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"], block_size=shape["block_size"])
    hc = LlamaConfig(vocab_size=VOCAB, hidden_size=mc.n_embd, intermediate_size=mlp_hidden_size(mc),
                     num_hidden_layers=mc.n_layer, num_attention_heads=mc.n_head, num_key_value_heads=mc.n_head,
                     max_position_embeddings=mc.block_size, rms_norm_eps=mc.norm_eps, rope_theta=mc.rope_theta,
                     tie_word_embeddings=True, attention_bias=False, mlp_bias=False, use_cache=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(hc, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    opt = ng.configure_optimizer(model, 1e-3, 0.1, (0.9, 0.99), "cpu")
    gen = torch.Generator().manual_seed(0)
    T, B = shape["block_size"], shape["batch_size"]

    def step():
        x, y = ng.get_batch(tokens, T, B, gen)
        logits = model(input_ids=x).logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    t = time_steps("hf-llama[fp32-eager]", step, B * T, warmup, steps)
    t.extra["params"] = sum(p.numel() for p in model.parameters())
    return t


def main():
    p = argparse.ArgumentParser(description="pretraining tokens/s: chatforge vs nanoGPT-style vs transformers Llama")
    p.add_argument("--shapes", default="small,medium", help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"chatforge settings: {', '.join(VARIANTS)}")
    p.add_argument("--peers", default="nanogpt,hf-llama", help="peer loops to time: nanogpt, hf-llama")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps (0 = the shape's default)")
    p.add_argument("--steps", type=int, default=0, help="timed steps (0 = the shape's default)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core)")
    p.add_argument("--json", default=None, help="also write the results here")
    a = p.parse_args()
    threads = set_threads(a.threads)
    machine = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    tokens = token_stream()
    results = {}
    for name in a.shapes.split(","):
        shape = SHAPES[name]
        warmup, steps = a.warmup or shape["warmup"], a.steps or shape["steps"]
        print(f"\n== shape {name}: {shape['n_layer']} layers, {shape['n_head']} heads, {shape['n_embd']} dims, "
              f"context {shape['block_size']}, batch {shape['batch_size']}, vocab {VOCAB}; "
              f"{warmup} warmup + {steps} timed steps, {threads} threads", flush=True)
        timings = []
        peers = a.peers.split(",") if a.peers else []
        if "nanogpt" in peers:
            timings.append(bench_nanogpt(shape, tokens, warmup, steps))
        if "hf-llama" in peers:
            timings.append(bench_hf_llama(shape, tokens, warmup, steps))
        for v in a.variants.split(","):
            torch._dynamo.reset()
            try:
                with contextlib.redirect_stderr(io.StringIO()):  # the compiler's warnings
                    timings.append(bench_chatforge(shape, v, tokens, warmup, steps))
            except Exception as e:  # a setting this machine cannot run (e.g. no C++ compiler for inductor)
                print(f"  chatforge[{v}]: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
                continue
            print(f"  {timings[-1].name}: {timings[-1].tokens_per_s:,.0f} tokens/s "
                  f"(warmup incl. compile {timings[-1].warmup_s:.1f}s)", flush=True)
        ref = next((t.tokens_per_s for t in timings if t.name.startswith("nanogpt")), float("nan"))
        rows = [{"loop": t.name, "params (M)": t.extra["params"] / 1e6, "tokens/s": t.tokens_per_s,
                 "ms/step (median)": 1000 * t.median_step_s, "warmup_s": t.warmup_s,
                 "vs nanogpt-style": t.tokens_per_s / ref} for t in timings]
        print_table(rows, list(rows[0]), title=f"shape {name}")
        results[name] = {"shape": shape, "warmup": warmup, "steps": steps, "rows": rows}
    write_json(a.json, {"machine": machine, "argv": vars(a), "results": results})


if __name__ == "__main__":
    main()
