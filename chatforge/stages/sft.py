"""Stage 2: supervised fine-tuning (SFT) of a base model on conversations.

Next-token prediction on the assistant's tokens only: the loss of one optimizer step is the
summed cross-entropy over every response token of the step (all micro-batches, all ranks)
divided by their global count, so accumulation and data parallelism give the same gradient
as one big batch. Eval: the held-out response-token loss, plus greedy and sampled
(temperature 1, a private seeded generator) answers to a fixed set of prompts, written to
metrics.jsonl as ``{"kind": "samples", ...}`` rows.

    chatforge sft --config CONFIG --out runs/tiny/sft --model.init=runs/tiny/base --data.path=sft.jsonl
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.config import Config, ConfigError, ResolvedRun
from chatforge.data.sft import SFTLoader, build_sft_data, conversation_prompt, prompt_ids, val_micro_batches
from chatforge.engine import Engine
from chatforge.evaluate import token_nll
from chatforge.model.load import load_causal_lm
from chatforge.model.lora import apply_lora
from chatforge.stages.common import finish, stage_entry, start
from chatforge.trainer import Trainer


def eval_prompt_set(cfg: Config, data, tok, block_size: int) -> list[tuple[str, list[int]]]:
    """(display text, prompt ids) of the fixed eval prompts: cfg.sft.eval_prompts (user messages),
    else the prompts of the first ``sft.n_eval_prompts`` held-out conversations that fit the context."""
    out = []
    if cfg.sft.eval_prompts:
        for i, p in enumerate(cfg.sft.eval_prompts):
            ids = prompt_ids(tok, [{"role": "user", "content": p}], f"sft.eval_prompts[{i}]")
            if len(ids) >= block_size:
                raise ConfigError(f"sft.eval_prompts[{i}] is {len(ids)} tokens; the context is {block_size}")
            out.append((p, ids))
        return out
    for c in data.val_conversations:
        if len(out) >= cfg.sft.n_eval_prompts:
            break
        msgs = conversation_prompt(c)
        ids = prompt_ids(tok, msgs, c.source)
        if len(ids) < block_size:
            out.append((msgs[-1]["content"], ids))
    return out


def print_plan(cfg: Config, model: torch.nn.Module, m: dict, expected_pad: float, T: int, W: int) -> None:
    B, A = cfg.train.batch_size, cfg.train.grad_accum
    print(f"sft: {model.num_params() / 1e6:.2f}M parameters from {cfg.model.init}; "
          f"{m['train']['examples']:,} train / {m['val']['examples']:,} val conversations, "
          f"{m['train_tokens']:,} train tokens ({m['train_response_tokens']:,} response)")
    print(f"sft: overlong policy '{cfg.data.overlong}' (context {T}): {m['train']['truncated']} truncated, "
          f"{m['train']['dropped_overlong'] + m['train']['dropped_no_response']} dropped; "
          f"padding fraction with length bucketing {expected_pad:.3f}")
    print(f"batch: {B} conversations x {A} accumulation x {W} processes = {B * A * W} per step")


def write_samples(trainer: Trainer, net: torch.nn.Module, tok, prompts: list, cfg: Config, step: int) -> None:
    """Greedy and sampled answers to the fixed prompts in metrics.jsonl (every rank generates: FSDP needs it)."""
    if not prompts:
        return
    ids = [p for _, p in prompts]
    gen = torch.Generator(device=trainer.info.device).manual_seed(cfg.train.seed)  # private: training RNG untouched
    with D.gathered(net) as raw, trainer.autocast():  # FSDP: weights gathered once for the whole decode
        greedy = Engine(raw).generate(ids, cfg.sft.max_new_tokens, temperature=0.0, stop_ids=[tok.end_id],
                                      pad_id=tok.pad_id)
        sampled = Engine(raw).generate(ids, cfg.sft.max_new_tokens, temperature=1.0, stop_ids=[tok.end_id],
                                       pad_id=tok.pad_id, generator=gen)

    def text(t: list[int]) -> str:
        return tok.decode(t[:-1] if t and t[-1] == tok.end_id else t)

    rows = [{"prompt": p, "greedy": text(g), "greedy_finished": gf, "sampled": text(s), "sampled_finished": sf}
            for (p, _), g, gf, s, sf in zip(prompts, greedy.tokens, greedy.finished, sampled.tokens, sampled.finished)]
    trainer.log.write({"kind": "samples", "step": step, "samples": rows})


@stage_entry
def run(cfg: Config, out: str | Path) -> dict:
    t_start = time.time()
    if not cfg.model.init:
        raise ConfigError("sft starts from a trained model: pass --model.init=DIR (e.g. runs/tiny/base, "
                          "the output of `chatforge pretrain`, or a local Hugging Face model directory)")
    out, info = start(cfg, out)
    model, mcfg, tok = load_causal_lm(cfg.model.init, info.device, trust_remote_code=cfg.model.trust_remote_code)
    model = apply_lora(model, cfg.lora)  # no-op unless lora.r > 0
    T, B, A, W = mcfg.block_size, cfg.train.batch_size, cfg.train.grad_accum, info.world_size
    data = build_sft_data(cfg, tok, T)
    loader = SFTLoader(data.train, B, A, tok.pad_id, seed=cfg.train.seed, rank=info.rank, world_size=W)
    prompts = eval_prompt_set(cfg, data, tok, T)
    expected_pad = loader.expected_padding()
    if info.is_main:
        print_plan(cfg, model, data.meta, expected_pad, T, W)
    trainer = Trainer(cfg, out, {"model": model}, info, state={"data": loader},
                      flops_per_token=model.flops_per_token(), model_cfg=mcfg)
    net = trainer.models["model"]

    def micro_step(batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        x, y, m = (t.to(info.device) for t in batch)  # (B, T) each
        loss_sum, _ = losses.lm_loss(net(x), y, m)  # right padding: causal attention needs no mask
        return loss_sum, m.sum(), {"tokens": (x != tok.pad_id).sum(), "positions": x.numel()}

    def step_fn(step: int) -> dict:
        res = trainer.accumulate(loader.next(), micro_step)  # normalised by the step's response tokens
        tokens, positions = res.pop("tokens"), res.pop("positions")
        return {"loss": res.pop("loss"), "tokens": tokens, "response_tokens": res.pop("count"),
                "pad_frac": 1.0 - tokens / max(positions, 1.0), **res}

    def eval_fn(step: int) -> dict:
        res = {}
        if data.val:
            batches = val_micro_batches(data.val, B, tok.pad_id, info.rank, W, cfg.train.eval_batches)
            total, n = token_nll(net, batches, info.device, trainer.autocast)
            if n > 0:
                res = {"val_loss": total / n, "val_response_tokens": n}
        write_samples(trainer, net, tok, prompts, cfg, step)
        return res

    has_eval = bool(data.val) or bool(prompts)
    result = trainer.fit(step_fn, eval_fn if has_eval else None, desc="sft")
    return finish(trainer, "model", cfg, tok, result, t_start=t_start, resolved=ResolvedRun(mcfg),
                  data={**data.meta, "expected_padding_fraction": expected_pad})
