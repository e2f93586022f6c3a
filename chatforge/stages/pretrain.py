"""Stage 1: pretrain a base model from scratch (or continue pretraining) on raw text."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.config import Config
from chatforge.data.pretrain import combine, corpus_paths, data_from_config, make_loader, val_windows
from chatforge.data.sources import corpus_files, tokenizer_sample
from chatforge.model.gpt import GPT
from chatforge.model.hf_causal import fresh_like
from chatforge.model.load import load_causal_lm, load_tokenizer
from chatforge.stages.common import check_out_dir, flatten_metrics, save_model_dir, setup, write_run_info
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


def build_model(cfg: Config, vocab_size: int, device: torch.device) -> torch.nn.Module:
    """A fresh, initialised GPT, or the starting model of ``model.init`` (its shape wins; any local
    Hugging Face causal LM, see model/load.py)."""
    if cfg.model.init:
        model, cfg.model, _ = load_causal_lm(cfg.model.init, trust_remote_code=cfg.model.trust_remote_code)
    else:
        model = GPT(cfg.model, vocab_size)
        model.init_weights()
    return model.to(device)


def run(cfg: Config, out: str | Path) -> dict:
    t_start = time.time()
    out = check_out_dir(Path(out))
    info = setup(cfg)
    tok = tokenizer_for(cfg, out, info)
    sources = data_from_config(cfg.data, tok, progress=cfg.train.progress) if info.is_main else None
    D.barrier()  # rank 0 tokenized into the shared cache; the others open it
    sources = sources or data_from_config(cfg.data, tok, progress=False)
    data = combine(sources)
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
    model = build_model(cfg, tok.vocab_size, info.device)
    T, B, A, W = cfg.model.block_size, cfg.train.batch_size, cfg.train.grad_accum, info.world_size
    loader = make_loader(sources, T, B, sampling=cfg.data.sampling, seed=cfg.train.seed,
                         rank=info.rank, world_size=W, source=", ".join(cfg.data.path))
    if info.is_main:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters, vocab {tok.vocab_size}, "
              f"{data.meta['train_tokens']:,} train / {data.meta['val_tokens']:,} val tokens")
        print(f"batch: {B} seqs x {T} tokens x {A} accumulation x {W} processes = {B * T * A * W:,} tokens per step")
    trainer = Trainer(cfg, out, {"model": model}, info, state={"data": loader},
                      flops_per_token=model.flops_per_token())
    net = trainer.models["model"]  # wrapped (DDP/FSDP, compiled): for training
    plain = trainer.raw["model"]  # eval needs no gradient sync and would only recompile a compiled model
    step_tokens = B * T * A * W

    def step_fn(step: int) -> dict:
        total = torch.zeros((), device=info.device)
        for i, (x, y) in enumerate(loader.next(A)):
            x, y = x.to(info.device, non_blocking=True), y.to(info.device, non_blocking=True)
            with trainer.micro(last=i == A - 1):
                loss_sum, _ = losses.lm_loss(net(x), y)
            trainer.backward(loss_sum * trainer.grad_scale() / step_tokens)
            total += loss_sum.detach().float()
        stats = trainer.optimizer_step()
        loss = D.all_reduce_sum(total).item() / step_tokens
        return {"loss": loss, "tokens": step_tokens, **stats, **loader.metrics()}

    def eval_fn(step: int) -> dict:
        nll = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, token count)
        for x, y in val_windows(data.val, T, B, cfg.train.eval_batches, info.rank, W):
            x, y = x.to(info.device), y.to(info.device)
            with trainer.autocast():
                loss_sum, n = losses.lm_loss(plain(x), y)
            nll += torch.tensor([loss_sum.item(), float(n)], dtype=torch.float64)
        nll = D.all_reduce_sum(nll)
        if nll[1] == 0:
            return {}
        val_loss = (nll[0] / nll[1]).item()
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) / data.val_bytes_per_token}

    result = trainer.fit(step_fn, eval_fn if data.meta["val_tokens"] > 1 else None, desc="pretrain")
    state = D.full_state_dict(net)
    if info.is_main:
        final = fresh_like(D.unwrap(net))  # an unsharded copy (same class and shapes)
        final.load_state_dict(state)
        save_model_dir(final, out, cfg.model, tok)
        metrics = flatten_metrics(result)
        write_run_info(out, cfg, metrics=metrics, wall_s=time.time() - t_start, data={
            "files": data.meta["files"], "fingerprint": data.meta["files_fingerprint"],
            "tokenizer_fingerprint": tok.fingerprint(), "train_tokens": data.meta["train_tokens"],
            "val_tokens": data.meta["val_tokens"], "token_cache": data.meta.get("dir"), **loader.metrics()})
        print(f"pretrain: done in {time.time() - t_start:.0f}s; " +
              ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("train_loss", "eval_val_loss", "eval_val_bpb")) +
              f"; model written to {out}")
    D.barrier()
    return flatten_metrics(result)
