"""A plain-PyTorch GPT-2 in the style of nanoGPT, the reference loop of the speed benchmarks.

Architecture as in nanoGPT's model.py: learned token and position embeddings, pre-LayerNorm
blocks (LayerNorm with bias), causal multi-head attention through scaled_dot_product_attention,
a 4x GELU MLP, a final LayerNorm and an output head tied to the token embedding; GPT-2 init
(std 0.02, residual projections 0.02/sqrt(2L)). The loop is nanoGPT's train.py reduced to one
process: fp32 eager, AdamW with weight decay on matrices only (fused only on CUDA, as nanoGPT),
warmup + cosine learning rate, gradient clipping at 1.0, random windows of the training split.

Run the nanoGPT README CPU configuration on Tiny Shakespeare (character level) and report wall
time and the validation loss over the full validation split::

    python benchmarks/peers/nanogpt_style.py --data ../shared/data/tinyshakespeare.txt

``--stream nanogpt`` (the default) is nanoGPT's shakespeare_char preparation: sorted characters -> ids,
the first 90% of the text for training, the last 10% for validation. ``--stream documents`` reads the
text as chatforge's pretraining loader does with a bytes-only vocabulary (``tokenizer.vocab_size: 0``),
so that both loops train and validate on the same symbols (benchmarks/time_to_quality.py): UTF-8 bytes
(one id per byte value present; on ASCII text that is one id per character, as above), the text cut
into documents at ``<|endoftext|>`` (blank ones dropped), each document preceded by one end-of-text id,
and the last ``int(0.1 * len(stream))`` ids of that stream held out.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def configure_optimizer(model: nn.Module, lr: float, weight_decay: float, betas, device_type: str):
    """nanoGPT's rule: decay every >= 2-D parameter, not biases/norms; fused AdamW only on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def get_lr(it: int, lr: float, min_lr: float, warmup: int, decay_iters: int) -> float:
    """nanoGPT's schedule: linear warmup, cosine decay to min_lr at decay_iters."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def get_batch(data: np.ndarray, block_size: int, batch_size: int, gen: torch.Generator):
    """Random windows (x, y), each (B, T) int64."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=gen).tolist()
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y


def make_step(model: GPT, opt: torch.optim.Optimizer, batch_fn, grad_clip: float = 1.0):
    """One nanoGPT training iteration: forward, backward, clip, step, zero."""

    def step():
        x, y = batch_fn()
        _, loss = model(x, y)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


@torch.no_grad()
def full_val_loss(model: GPT, val: np.ndarray, block_size: int, batch_size: int) -> float:
    """Mean loss over non-overlapping windows covering the whole validation split."""
    model.eval()
    n = (len(val) - 1) // block_size
    total, count = 0.0, 0
    for lo in range(0, n, batch_size):
        starts = range(lo * block_size, min(n, lo + batch_size) * block_size, block_size)
        w = torch.from_numpy(np.stack([val[s:s + block_size + 1].astype(np.int64) for s in starts]))  # (B, T+1)
        logits, _ = model(w[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    model.train()
    return total / count


def char_data(path: str, val_fraction: float = 0.1):
    """nanoGPT's shakespeare_char prepare.py: sorted characters -> ids, 90/10 split."""
    text = open(path, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * (1 - val_fraction))
    return ids[:n], ids[n:], len(chars)


EOT = "<|endoftext|>"


def document_stream(text: str) -> list[bytes]:
    """The documents of ``text`` as chatforge's .txt reader cuts them: split at ``<|endoftext|>``, blank
    (whitespace-only) documents dropped, each kept exactly (its newlines included), as UTF-8 bytes."""
    return [d.encode("utf-8") for d in text.split(EOT) if d.strip()]


def document_data(path: str, val_fraction: float = 0.1):
    """(train ids, val ids, vocab) by chatforge's pretraining rule on a bytes-only vocabulary: every
    document is ``<|endoftext|> + its bytes``; ids are the sorted byte values present, then one id for
    the end-of-text mark; the last ``int(val_fraction * len(stream))`` ids are the validation split."""
    docs = document_stream(open(path, encoding="utf-8").read())
    values = sorted(set().union(*(set(d) for d in docs)))  # byte values present
    lut = np.zeros(256, dtype=np.uint16)
    lut[values] = np.arange(len(values), dtype=np.uint16)
    eot = len(values)
    ids = np.concatenate([np.concatenate([[eot], lut[np.frombuffer(d, dtype=np.uint8)]]) for d in docs]).astype(np.uint16)
    tail = int(len(ids) * val_fraction)
    return ids[: len(ids) - tail], ids[len(ids) - tail :], eot + 1


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/tinyshakespeare.txt")
    p.add_argument("--stream", choices=("nanogpt", "documents"), default="nanogpt",
                   help="nanogpt: sorted characters, 90/10 split; documents: chatforge's bytes-only rule (see above)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--max_iters", type=int, default=2000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min_lr", type=float, default=1e-4)
    p.add_argument("--lr_decay_iters", type=int, default=2000)
    p.add_argument("--warmup_iters", type=int, default=100)
    p.add_argument("--beta2", type=float, default=0.99)
    p.add_argument("--weight_decay", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from benchmarks.common import machine_info, set_threads

    set_threads(a.threads)
    torch.manual_seed(a.seed)
    t_start = time.time()
    train, val, vocab = (char_data if a.stream == "nanogpt" else document_data)(a.data)
    cfg = GPTConfig(block_size=a.block_size, vocab_size=vocab, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    model = GPT(cfg)
    opt = configure_optimizer(model, a.lr, a.weight_decay, (0.9, a.beta2), "cpu")
    gen = torch.Generator().manual_seed(a.seed)
    step = make_step(model, opt, lambda: get_batch(train, a.block_size, a.batch_size, gen))
    print(f"nanogpt-style: {model.num_params() / 1e6:.2f}M parameters, vocab {vocab}, {len(train):,} train / "
          f"{len(val):,} val tokens, {a.max_iters} iters")
    t_train = time.time()
    for it in range(a.max_iters):
        for g in opt.param_groups:
            g["lr"] = get_lr(it, a.lr, a.min_lr, a.warmup_iters, a.lr_decay_iters)
        loss = step()
        if it % 250 == 0 or it == a.max_iters - 1:
            print(f"iter {it}: loss {loss.item():.4f}, {time.time() - t_train:.1f}s")
    train_s = time.time() - t_train
    t_eval = time.time()
    val_loss = full_val_loss(model, val, a.block_size, a.batch_size)
    eval_s = time.time() - t_eval
    wall = time.time() - t_start
    tps = a.max_iters * a.batch_size * a.block_size / train_s
    print(f"nanogpt-style: val loss (full split) {val_loss:.4f}; train {train_s:.1f}s ({1000 * train_s / a.max_iters:.1f} ms/iter, "
          f"{tps:,.0f} tokens/s); eval {eval_s:.1f}s; wall {wall:.1f}s")
    if a.json:
        from benchmarks.common import write_json

        write_json(a.json, {"machine": machine_info(), "args": vars(a), "val_loss": val_loss, "vocab": vocab,
                            "train_tokens": len(train), "val_tokens": len(val), "train_s": train_s,
                            "eval_s": eval_s, "wall_s": wall, "tokens_per_s": tps})


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
