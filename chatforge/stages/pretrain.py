"""Stage 1: pretrain a base model from scratch (or continue pretraining) on raw text.

Next-token prediction on every token: a micro-step returns the summed cross-entropy of its windows and their
token count, and the trainer divides by the step's global count. Eval: held-out loss and bits per byte.
The tokenizer is the starting model's, ``tokenizer.path``, or trained here on the corpus.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.config import Config, ModelConfig, ResolvedRun
from chatforge.data.pretrain import combine, corpus_paths, data_from_config, make_loader, val_windows
from chatforge.data.sources import corpus_files, tokenizer_sample
from chatforge.evaluate import token_nll
from chatforge.model.gpt import GPT
from chatforge.model.load import load_causal_lm, load_tokenizer
from chatforge.stages.common import finish, stage_entry, start
from chatforge.tokenizer import ChatTokenizer, train_tokenizer
from chatforge.trainer import Trainer


def tokenizer_for(cfg: Config, out: Path, info: D.DistInfo) -> ChatTokenizer:
    """The tokenizer named by the config, the starting model's, or a new one trained on the corpus (rank 0)."""
    src = cfg.tokenizer.path or cfg.model.init
    if src:
        return load_tokenizer(src, trust_remote_code=cfg.model.trust_remote_code)  # chat tokens added if missing
    if info.is_main:  # BPE merges are learnt from a bounded sample of the corpus
        files = corpus_files(corpus_paths(cfg.data))
        train_tokenizer(tokenizer_sample(files, cfg.tokenizer.sample_chars), cfg.tokenizer.vocab_size).save(out)
    D.barrier()
    return ChatTokenizer.load(out)


def build_model(cfg: Config, vocab_size: int, device: torch.device) -> tuple[torch.nn.Module, ModelConfig]:
    """(model, its shape): a fresh, initialised GPT of ``cfg.model``, or the starting model of ``model.init``
    (its own shape; any local Hugging Face causal LM, see model/load.py)."""
    if cfg.model.init:
        model, mcfg, _ = load_causal_lm(cfg.model.init, trust_remote_code=cfg.model.trust_remote_code)
    else:
        model, mcfg = GPT(cfg.model, vocab_size), cfg.model
        model.init_weights()
    return model.to(device), mcfg


@stage_entry
def run(cfg: Config, out: str | Path) -> dict:
    t_start = time.time()
    out, info = start(cfg, out)
    tok = tokenizer_for(cfg, out, info)
    sources = data_from_config(cfg.data, tok, progress=cfg.train.progress) if info.is_main else None
    D.barrier()  # rank 0 tokenized into the shared cache; the others open it
    sources = sources or data_from_config(cfg.data, tok, progress=False)
    data = combine(sources)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model, mcfg = build_model(cfg, tok.vocab_size, info.device)
    T, B, A, W = mcfg.block_size, cfg.train.batch_size, cfg.train.grad_accum, info.world_size
    loader = make_loader(sources, T, B, sampling=cfg.data.sampling, seed=cfg.train.seed,
                         rank=info.rank, world_size=W, source=", ".join(cfg.data.path))
    if info.is_main:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, "
              f"{data.meta['train_tokens']:,} train / {data.meta['val_tokens']:,} val tokens")
        print(f"batch: {B} seqs x {T} tokens x {A} accumulation x {W} processes = {B * T * A * W:,} tokens per step")
    trainer = Trainer(cfg, out, {"model": model}, info, state={"data": loader},
                      flops_per_token=model.flops_per_token(), model_cfg=mcfg)
    net = trainer.models["model"]  # wrapped (DDP/FSDP, compiled): for training
    plain = trainer.raw["model"]  # eval needs no gradient sync and would only recompile a compiled model

    def micro_step(xy) -> tuple[torch.Tensor, int, dict]:
        x, y = (t.to(info.device, non_blocking=True) for t in xy)  # (B, T) each
        loss_sum, _ = losses.lm_loss(net(x), y)
        return loss_sum, y.numel(), {}  # every target is a real token

    def step_fn(step: int) -> dict:
        res = trainer.accumulate(loader.next(A), micro_step)
        return {"loss": res.pop("loss"), "tokens": res.pop("count"), **res, **loader.metrics()}

    def eval_fn(step: int) -> dict:
        total, n = token_nll(plain, val_windows(data.val, T, B, cfg.train.eval_batches, info.rank, W), info.device,
                             trainer.autocast)
        if n == 0:
            return {}
        return {"val_loss": total / n, "val_bpb": total / n / math.log(2) / data.val_bytes_per_token}

    result = trainer.fit(step_fn, eval_fn if data.meta["val_tokens"] > 1 else None, desc="pretrain")
    return finish(trainer, "model", cfg, tok, result, t_start=t_start, resolved=ResolvedRun(mcfg), data={
        "files": data.meta["files"], "fingerprint": data.meta["files_fingerprint"],
        "tokenizer_fingerprint": tok.fingerprint(), "train_tokens": data.meta["train_tokens"],
        "val_tokens": data.meta["val_tokens"], "token_cache": data.meta.get("dir"), **loader.metrics()},
        shown=("train_loss", "eval_val_loss", "eval_val_bpb"))
