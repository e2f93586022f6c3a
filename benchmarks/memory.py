"""Peak CPU memory (max RSS) of each stage, for a tiny and a 124M-parameter Hugging Face model.

    .venv/bin/python benchmarks/memory.py                       # both sizes, every stage, a markdown table
    .venv/bin/python benchmarks/memory.py --sizes tiny --lora 8 # tiny only, LoRA r=8 in every stage

Each stage runs a few steps in its own subprocess (``--child``), which reports its own
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at exit: the peak resident memory of the whole process
(Python, torch and transformers included; the baseline row is an import-only process). Models are
GPT-2-family (``GPT2LMHeadModel`` through chatforge's transformers wrapper), randomly initialised
locally: ``tiny`` = 2 layers x 64 wide; ``124m`` = GPT-2 small (12 x 768, 50257-row vocabulary,
124.4M parameters). The tokenizer is a chatforge BPE trained on the demo corpus. Chain:
every stage starts from that model (same shapes as a real sft -> rm -> dpo/ppo/grpo chain); ppo and
grpo are rewarded by the rm written in the run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "rm", "dpo", "ppo", "grpo")
SIZES = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=None),
    "124m": dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257),
}
# a few steps of each stage on the demo's short chats
COMMON = ["train.max_steps=3", "train.batch_size=4", "train.eval_every=0", "train.ckpt_every=0",
          "train.log_every=1", "train.progress=false", "train.dtype=fp32", "train.device=cpu", "train.threads=2",
          "optim.warmup_steps=1", "data.val_fraction=0.0"]
STAGE_ARGS = {
    "sft": ["sft.n_eval_prompts=0"],
    "rm": ["rm.norm_samples=16"],
    "dpo": [],
    "ppo": ["rl.prompts_per_step=4", "rl.max_new_tokens=16", "rl.ppo_epochs=1", "train.max_steps=2"],
    "grpo": ["rl.prompts_per_step=2", "rl.group_size=2", "rl.max_new_tokens=16", "train.max_steps=2",
             "rl.grpo_kl_coef=0.05"],
}


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_model(size: str, root: Path, world: dict) -> Path:
    """A random GPT-2-family model + chatforge tokenizer as a Hugging Face directory."""
    import torch
    import transformers as T

    from chatforge.data.pretrain import iter_documents
    from chatforge.tokenizer import train_tokenizer

    d = root / f"init_{size}"
    if (d / "config.json").is_file():
        return d
    tok = train_tokenizer(iter_documents([world["corpus"]]), 512)
    spec = dict(SIZES[size])
    spec["vocab_size"] = spec["vocab_size"] or tok.vocab_size
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(**spec, bos_token_id=tok.bos_id, eos_token_id=tok.end_id,
                                           pad_token_id=tok.pad_id))
    model.save_pretrained(d)
    tok.save(d)
    return d


def child(stage: str, init: str, out: str, extra: list[str]) -> None:
    """Run one stage in this process and print its peak RSS as JSON (the last stdout line)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    t0, error = time.time(), None
    try:
        if stage != "baseline":
            import importlib

            from chatforge.config import load_config

            cfg = load_config(stage, None, [f"model.init={init}", *COMMON, *STAGE_ARGS[stage], *extra])
            importlib.import_module(f"chatforge.stages.{stage}").run(cfg, out)
        else:
            import torch  # noqa: F401
            import transformers  # noqa: F401

            import chatforge.model.load  # noqa: F401
    except Exception as e:  # still report the peak of the steps that ran
        import traceback

        traceback.print_exc()
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    print(json.dumps({"stage": stage, "maxrss_mb": round(maxrss_mb(), 1), "wall_s": round(time.time() - t0, 1),
                      "error": error}))


def run_child(stage: str, init: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--init", str(init), "--out", str(out), "--", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    try:
        return json.loads(res.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise SystemExit(f"{stage} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank for every stage (0 = full fine-tuning)")
    ap.add_argument("--work", default=None, help="working folder (default: a temporary one)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--init", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.init, a.out, a.extra)
        return

    sys.path.insert(0, str(ROOT))
    from chatforge.demo.files import write_world

    root = Path(a.work or tempfile.mkdtemp(prefix="chatforge_mem_"))
    root.mkdir(parents=True, exist_ok=True)
    world = write_world(root / "world", seed=0, corpus_mb=0.3, n_sft=200, n_pairs=200, n_rl_prompts=100,
                        n_eval_prompts=0)
    lora = [f"lora.r={a.lora}", "lora.target_modules=[c_attn,c_proj,c_fc]"] if a.lora else []
    rows = [("baseline (imports only)", "", run_child("baseline", root, root, [])["maxrss_mb"], "", "")]
    for size in a.sizes:
        init = make_model(size, root, world)
        data = {"sft": [f"data.path=[{world['sft']}]"], "rm": [f"data.path=[{world['preferences']}]"],
                "dpo": [f"data.path=[{world['preferences']}]"],
                "ppo": [f"data.path=[{world['rl_prompts']}]", f"rl.reward_model={root / f'{size}_rm'}"],
                "grpo": [f"data.path=[{world['rl_prompts']}]", f"rl.reward_model={root / f'{size}_rm'}"]}
        for stage in a.stages:
            r = run_child(stage, init, root / f"{size}_{stage}", data[stage] + lora)
            note = f"failed: {r['error']}" if r.get("error") else ""
            rows.append((stage, size, r["maxrss_mb"], r["wall_s"], note))
            print(f"{size:>5} {stage:>5}: peak RSS {r['maxrss_mb']:8.1f} MB  ({r['wall_s']:.0f}s) {note}", flush=True)
    print("\n| stage | model | peak RSS (MB) | wall (s) | note |\n|---|---|---:|---:|---|")
    for stage, size, mb, s, note in rows:
        print(f"| {stage} | {size} | {mb:.0f} | {s} | {note} |")


if __name__ == "__main__":
    main()
