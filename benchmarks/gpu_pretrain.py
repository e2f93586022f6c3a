"""Pretraining speed of a GPT-2-small-shaped Llama (124M parameters) on one GPU: tokens/s and MFU.

Used by benchmarks/gpu_check.sh. The model is the native GPT with 12 layers, 12 heads, 768 dims,
context 1024 and a vocabulary padded to 50304 rows (as nanoGPT pads GPT-2's 50257): the demo
corpus's BPE has far fewer ids than that, and the padding keeps the shape, the parameter count
and the FLOPs of GPT-2 small; the unused rows are never targets. The training loop is the one
every stage uses (chatforge.trainer.Trainer, bf16 autocast, torch.compile, fused AdamW), fed
by the pretraining TokenLoader, with the pretrain stage's step function.

    python benchmarks/gpu_pretrain.py --data corpus.txt --tokenizer tok/ --out runs/bench124m [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from chatforge import losses  # noqa: E402
from chatforge.config import load_config  # noqa: E402
from chatforge.data.pretrain import TokenLoader, build_token_data  # noqa: E402
from chatforge.metrics import read_metrics  # noqa: E402
from chatforge.model.gpt import GPT  # noqa: E402
from chatforge.stages.common import start  # noqa: E402
from chatforge.tokenizer import ChatTokenizer  # noqa: E402
from chatforge.trainer import Trainer  # noqa: E402

PADDED_VOCAB = 50304


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu = a smoke test of this script (no MFU)")
    p.add_argument("--shape", default="12,12,768,1024", help="layers,heads,dims,context (GPT-2 small)")
    p.add_argument("--warmup-skip", type=int, default=20, help="steps left out of the summary (compilation)")
    args = p.parse_args()

    L, H, C, T = (int(v) for v in args.shape.split(","))
    on_gpu = args.device != "cpu"
    cfg = load_config("pretrain", None, [
        f"model.n_layer={L}", f"model.n_head={H}", f"model.n_embd={C}", f"model.block_size={T}",
        "model.tie_embeddings=true", f"data.path=[{args.data}]", f"tokenizer.path={args.tokenizer}",
        "data.val_fraction=0.01", "optim.lr=6e-4", "optim.warmup_steps=50", f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch_size}", f"train.grad_accum={args.grad_accum}", f"train.dtype={'bf16' if on_gpu else 'fp32'}",
        f"train.compile={str(not args.no_compile).lower()}", "train.log_every=1", "train.eval_every=0",
        "train.ckpt_every=0", "train.progress=false", f"train.device={args.device}"])
    out, info = start(cfg, args.out)
    if on_gpu and info.device.type != "cuda":
        raise SystemExit("error: no CUDA device (torch.cuda.is_available() is False)")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    tok = ChatTokenizer.load(args.tokenizer)
    data = build_token_data(cfg.data.path, tok, out / "tokens", cfg.data.val_fraction, progress=False)
    torch.manual_seed(cfg.train.seed)
    vocab = max(PADDED_VOCAB, tok.vocab_size)
    model = GPT(cfg.model, vocab)
    model.init_weights()
    model = model.to(info.device)
    B, A, W = cfg.train.batch_size, cfg.train.grad_accum, info.world_size
    loader = TokenLoader(data.train, T, B, seed=cfg.train.seed, rank=info.rank, world_size=W)
    step_tokens = B * T * A * W
    print(f"gpu_pretrain: {model.num_params() / 1e6:.1f}M parameters (vocab {vocab}, tokenizer {tok.vocab_size} ids), "
          f"{data.meta['train_tokens']:,} train tokens; {device_name(info.device)}")
    print(f"batch: {B} seqs x {T} tokens x {A} accumulation x {W} processes = {step_tokens:,} tokens per step; "
          f"{model.flops_per_token() / 1e9:.3f} GFLOP per token")
    trainer = Trainer(cfg, out, {"model": model}, info, state={"data": loader}, flops_per_token=model.flops_per_token())
    net = trainer.models["model"]

    def micro_step(xy):  # the pretrain stage's micro-step
        x, y = (t.to(info.device, non_blocking=True) for t in xy)
        loss_sum, _ = losses.lm_loss(net(x), y)
        return loss_sum, y.numel(), {}

    def step_fn(step: int) -> dict:  # the pretrain stage's step function (the loss .item() syncs: real GPU time)
        res = trainer.accumulate(loader.next(A), micro_step)
        return {"loss": res.pop("loss"), "tokens": res.pop("count"), **res}

    t0 = time.time()
    trainer.fit(step_fn, None, desc="bench124m")
    wall = time.time() - t0
    rows = [r for r in read_metrics(out) if r.get("kind") == "train"]
    timed = [r for r in rows if r["step"] > args.warmup_skip] or rows
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    mfus = [r["mfu"] for r in timed if "mfu" in r]
    summary = {
        "device": device_name(info.device), "torch": torch.__version__,
        "params_M": round(model.num_params() / 1e6, 2), "vocab": vocab, "block_size": T, "batch_tokens": step_tokens,
        "steps": len(rows), "compile": cfg.train.compile, "dtype": cfg.train.dtype,
        "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
        "median_tokens_per_s": round(tps), "median_mfu": round(statistics.median(mfus), 4) if mfus else None,
        "first_step_s": rows[0]["step_s"], "wall_s": round(wall, 1),
        "max_memory_GiB": round(torch.cuda.max_memory_allocated(info.device) / 2**30, 2) if on_gpu else None,
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=1))
    print("RESULT " + json.dumps(summary))
    if not rows[-1]["loss"] < rows[0]["loss"]:
        raise SystemExit(f"error: the loss did not fall ({rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f})")


if __name__ == "__main__":
    main()
