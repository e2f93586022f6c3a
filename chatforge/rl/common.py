"""What PPO and GRPO/RLOO share: prompts and their loader, the frozen roles, the rollout, the update loop,
global statistics, sample logging and the final save.

Memory plan (all roles on one device):
  actor      trainable: weights + grads + AdamW state (4x its weights)
  critic     trainable (PPO only): the same again, on the RM's or the policy's trunk
  reference  frozen copy of the SFT policy: weights only, eval(), requires_grad False, inference mode
             (PPO always; GRPO/RLOO only when rl.grpo_kl_coef > 0)
  reward     frozen RM (weights only) or a Python function (no memory)
Frozen roles can live on the CPU between their forwards (``rl.offload_frozen``), which leaves the
accelerator to the trainable roles during generation and updates. Every role's bytes are printed at start.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from chatforge import distributed as D
from chatforge.config import Config, ConfigError
from chatforge.data.batching import BucketBatcher
from chatforge.data.prompts import read_prompts
from chatforge.data.records import DataError
from chatforge.metrics import read_metrics
from chatforge.model.load import load_causal_lm
from chatforge.model.lora import apply_lora, reference_from
from chatforge.rl.rollout import RolloutBatch, build_batch, response_logprobs, sample
from chatforge.stages.common import check_out_dir, flatten_metrics, save_model_dir, setup, write_run_info
from chatforge.tokenizer import render_prompt
from chatforge.trainer import Trainer, TrainingError

# ---------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptSet:
    ids: list[list[int]]
    """Rendered generation prompts (ending with <|assistant|>)."""
    texts: list[str]
    """The last user message of each prompt (what a reward function reads as the prompt)."""
    sources: list[str]
    """'file:line' of each prompt."""
    skipped_long: int
    """Prompts dropped because they leave fewer than max_new_tokens of context."""
    meta: dict


def last_user_text(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def load_prompt_set(cfg: Config, tok, block_size: int, log: bool = True) -> PromptSet:
    """Read and render cfg.data.path; prompts longer than block_size - rl.max_new_tokens are counted skips."""
    if not cfg.data.path:
        raise ConfigError("no prompts: set --data.path=PROMPTS.jsonl (JSON strings, {\"prompt\"} or {\"messages\"})")
    records = read_prompts(cfg.data.path, strict=cfg.data.strict)
    limit = block_size - cfg.rl.max_new_tokens
    if limit < 2:
        raise ConfigError(f"rl.max_new_tokens={cfg.rl.max_new_tokens} leaves no room for a prompt in the "
                          f"model's context of {block_size} tokens")
    ids, texts, sources, long = [], [], [], 0
    for p in records:
        r = render_prompt(tok, p.messages)
        if len(r) > limit:
            long += 1
            continue
        ids.append(r)
        texts.append(last_user_text(p.messages))
        sources.append(p.source)
        if cfg.data.max_examples and len(ids) >= cfg.data.max_examples:
            break
    files = ", ".join(map(str, cfg.data.path))
    if not ids:
        raise DataError(files, 0, f"no usable prompt: all {len(records)} are longer than {limit} tokens "
                                  f"(block_size {block_size} - rl.max_new_tokens {cfg.rl.max_new_tokens})")
    if log:
        skips = getattr(records, "skips", None)
        print(f"prompts: {len(ids)} from {files}; {long} skipped as longer than {limit} tokens"
              + (f"; bad records skipped: {skips}" if skips and len(skips) else ""))
    meta = {"files": [str(p) for p in cfg.data.path], "prompts": len(ids), "skipped_long": long}
    return PromptSet(ids, texts, sources, long, meta)


class PromptLoader:
    """Prompt indices per rollout: a shuffled global batch of ``per_rank * world_size`` prompts per step,
    sliced by rank (world-size invariant, like data/batching); its position is checkpoint state."""

    def __init__(self, n: int, per_rank: int, seed: int, rank: int = 0, world_size: int = 1):
        self.batcher = BucketBatcher([1] * n, per_rank, 1, seed=seed, rank=rank, world_size=world_size, bucket=False)

    def next(self) -> list[int]:
        return self.batcher.next()[0]

    def state_dict(self) -> dict:
        return self.batcher.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.batcher.load_state_dict(s)


# ---------------------------------------------------------------------------------------------- roles


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere (RL log-prob ratios must not be noisy)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    if hasattr(model, "cfg") and hasattr(model.cfg, "dropout"):
        model.cfg.dropout = 0.0
    return model


def freeze(model: nn.Module) -> nn.Module:
    """A frozen role: eval mode, no gradients, dropout off."""
    disable_dropout(model).eval()
    model.requires_grad_(False)
    return model


def module_bytes(model: Optional[nn.Module]) -> int:
    """Bytes of a module's parameters and buffers (each shared tensor once)."""
    if model is None:
        return 0
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def reward_module(reward) -> Optional[nn.Module]:
    """The nn.Module behind a reward object (None for a Python function)."""
    if isinstance(reward, nn.Module):
        return reward
    m = getattr(reward, "model", None)
    return m if isinstance(m, nn.Module) else None


def print_role_memory(roles: dict[str, Optional[nn.Module]], trainable: tuple[str, ...]) -> dict[str, int]:
    sizes = {name: module_bytes(m) for name, m in roles.items()}
    parts = []
    for name, b in sizes.items():
        if roles[name] is None:
            parts.append(f"{name} -")
        elif name in trainable:
            parts.append(f"{name} {b / 2**20:.1f} MiB (+grads+AdamW ~{3 * b / 2**20:.1f} MiB)")
        else:
            parts.append(f"{name} {b / 2**20:.1f} MiB (frozen)")
    print("memory: " + ", ".join(parts))
    return sizes


# ---------------------------------------------------------------------------------------------- statistics


def global_sums(*values: float | torch.Tensor) -> list[float]:
    """Sum scalars over ranks in one all-reduce."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    return D.all_reduce_sum(t).tolist()


def global_masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(mean, unbiased variance) of x over mask == 1 on every rank together."""
    m = mask.to(torch.float64)
    xd = x.detach().to(torch.float64)
    n, s, s2 = global_sums(m.sum(), (xd * m).sum(), (xd * xd * m).sum())
    if n < 2:
        return (s / max(n, 1.0), 1.0)
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0) * n / (n - 1)
    return mean, var


def check_finite(name: str, x: torch.Tensor, step: int) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise TrainingError(f"step {step + 1}: {bad} non-finite value(s) in {name}; the run stops and the last "
                            f"checkpoint is kept (check the reward model / reward function)")


def final_scores(norm: torch.Tensor, finished: torch.Tensor, rl) -> torch.Tensor:
    """The score each response earns: the normalised reward, clipped to +-rl.reward_clip if set, replaced by
    rl.missing_eos_penalty for responses that never ended (when set). (B,), (B,) bool -> (B,)."""
    score = norm.float()
    if rl.reward_clip is not None:
        score = score.clamp(-rl.reward_clip, rl.reward_clip)
    if rl.missing_eos_penalty is not None:
        score = torch.where(finished.to(score.device), score, torch.full_like(score, float(rl.missing_eos_penalty)))
    return score


# ---------------------------------------------------------------------------------------------- the update loop


def update_epochs(trainer: Trainer, batch: RolloutBatch, rl, micro_rows: int, generator: torch.Generator,
                  loss_fn: Callable[[RolloutBatch, dict, int], tuple[torch.Tensor, dict]]) -> dict[str, float]:
    """rl.ppo_epochs epochs over rl.minibatches shuffled minibatches of this rank's rollout rows, one
    optimizer step (trainer.optimizer_step) per minibatch, micro-batches of ``micro_rows`` rows.

    ``loss_fn(rows_batch, counts, epoch)`` returns the micro-batch's loss already divided by the minibatch's
    GLOBAL counts (counts = {"tokens", "seqs"} over all ranks), so micro-batching and ranks leave the
    gradient unchanged, and stats weighted the same way (they sum to the minibatch mean). Returns the stats
    averaged over the minibatches in which they appeared, plus grad norms.
    """
    n_rows = len(batch)
    M = max(1, min(rl.minibatches, n_rows))
    sums: dict[str, float] = defaultdict(float)
    seen: dict[str, int] = defaultdict(int)
    for epoch in range(rl.ppo_epochs):
        perm = torch.randperm(n_rows, generator=generator)
        for mb in perm.tensor_split(M):
            mask = batch.response_mask[mb.to(batch.response_mask.device)]
            tokens, seqs = global_sums(mask.sum(), len(mb))
            counts = {"tokens": max(tokens, 1.0), "seqs": max(seqs, 1.0)}
            chunks = mb.split(max(1, micro_rows))
            mb_stats: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
            for i, rows in enumerate(chunks):
                sub = batch.select(rows)
                with trainer.micro(last=i == len(chunks) - 1):
                    loss, stats = loss_fn(sub, counts, epoch)
                trainer.backward(loss * trainer.grad_scale())
                for k, v in stats.items():
                    mb_stats[k] = mb_stats[k] + float(v)
            for k, v in trainer.optimizer_step().items():
                sums[k] += v
                seen[k] += 1
            keys = sorted(mb_stats)
            if keys:
                totals = global_sums(*[mb_stats[k] for k in keys])
                for k, v in zip(keys, totals):
                    sums[k] += v
                    seen[k] += 1
    return {k: sums[k] / seen[k] for k in sums}


# ---------------------------------------------------------------------------------------------- the run


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """The sampling generator of one step: a pure function of (seed, step, rank), so resume is exact."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 4099 + rank * 7919) % (2**63 - 1))
    return g


@dataclass
class Rollout:
    batch: RolloutBatch  # on the device; extra holds old_logp (and ref_logp when there is a reference)
    prompt_texts: list[str]
    response_texts: list[str]
    raw: torch.Tensor  # (B,) reward before normalisation
    norm: torch.Tensor  # (B,) normalised reward (RM) or the function's value
    score: torch.Tensor  # (B,) after clipping and the missing-EOS penalty
    gen_s: float  # seconds spent generating


class RLRun:
    """Set-up shared by the RL stages: process group, tokenizer, actor, reference, reward, prompts, loader."""

    def __init__(self, cfg: Config, out: str | Path, *, need_ref: bool):
        from chatforge.rl.reward import load_reward  # written alongside; imported late

        self.t_start = time.time()
        self.cfg, rl = cfg, cfg.rl
        if not cfg.model.init:
            raise ConfigError(f"{cfg.stage} needs a starting policy: --model.init=runs/tiny/sft")
        if (rl.reward_model is None) == (rl.reward_fn is None):
            raise ConfigError("give exactly one of --rl.reward_model=RM_DIR or --rl.reward_fn=module:function")
        if rl.temperature <= 0:
            raise ConfigError(f"rl.temperature must be > 0 (got {rl.temperature}); RL samples from the policy")
        if rl.ppo_epochs < 1 or rl.minibatches < 1 or rl.prompts_per_step < 1:
            raise ConfigError("rl.ppo_epochs, rl.minibatches and rl.prompts_per_step must be >= 1")
        self.out = check_out_dir(Path(out))
        self.info = info = setup(cfg)
        self.device = info.device
        actor, mcfg, tok = load_causal_lm(cfg.model.init, info.device, trust_remote_code=cfg.model.trust_remote_code)
        mcfg.dropout = 0.0
        cfg.model = mcfg
        actor = apply_lora(actor, cfg.lora)  # no-op unless lora.r > 0
        self.actor, self.tok = disable_dropout(actor), tok
        self.ref = freeze(reference_from(actor)) if need_ref else None  # LoRA: adapters off, no copy
        self.reward = load_reward(rl, info.device)
        if rl.reward_model is not None and hasattr(self.reward, "check_tokenizer"):
            self.reward.check_tokenizer(tok)
        rm = reward_module(self.reward)
        if rm is not None:
            freeze(rm)
        self.prompts = load_prompt_set(cfg, tok, mcfg.block_size, log=info.is_main)
        self.loader = PromptLoader(len(self.prompts.ids), rl.prompts_per_step, cfg.train.seed, info.rank,
                                   info.world_size)
        self._frozen = [m for m in (self.ref, rm) if m is not None]
        if rl.offload_frozen:
            for m in self._frozen:
                m.to("cpu")

    # -- frozen roles on the device only while they run
    @contextlib.contextmanager
    def frozen(self):
        if self.cfg.rl.offload_frozen and self.device.type != "cpu":
            for m in self._frozen:
                m.to(self.device)
            try:
                yield
            finally:
                for m in self._frozen:
                    m.to("cpu")
        else:
            yield

    def frozen_forward(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run a frozen role in inference mode; the result is cloned into a normal tensor (usable in losses)."""
        with self.frozen(), torch.inference_mode():
            out = fn()
        return out.clone()

    def chunked(self, batch: RolloutBatch, fn: Callable[[RolloutBatch], torch.Tensor]) -> torch.Tensor:
        """fn over micro-batches of train.batch_size rows, padded back to (B, R)."""
        B, R = batch.response_mask.shape
        out = torch.zeros((B, R), dtype=torch.float32, device=batch.input_ids.device)
        for rows in torch.arange(B).split(max(1, self.cfg.train.batch_size)):
            sub = batch.select(rows)
            v = fn(sub)  # (b, r)
            out[rows.to(out.device), :v.shape[1]] = v.float()
        return out

    def rollout(self, trainer: Trainer, step: int, repeat: int = 1) -> Rollout:
        """Next prompts (each ``repeat`` times, consecutively), sampled responses, old/ref log-probs, scores."""
        rl, tok, dev = self.cfg.rl, self.tok, self.device
        rows = self.loader.next()
        prompt_ids = [self.prompts.ids[i] for i in rows for _ in range(repeat)]
        prompt_texts = [self.prompts.texts[i] for i in rows for _ in range(repeat)]
        actor = D.unwrap(trainer.models["actor"])
        t0 = time.time()
        with D.gathered(trainer.models["actor"]) as gen_actor, trainer.autocast():  # FSDP: gather once, decode freely
            s = sample(gen_actor, prompt_ids, rl.max_new_tokens, rl.temperature, tok.end_id, tok.pad_id,
                       step_generator(self.cfg.train.seed, step, self.info.rank, dev))
        gen_s = time.time() - t0
        batch = build_batch(prompt_ids, s.response_ids, tok.pad_id, tok.end_id).to(dev)
        T = rl.temperature
        with torch.no_grad(), trainer.autocast():
            batch.extra["old_logp"] = self.chunked(batch, lambda b: response_logprobs(actor, b, T)[0])
            if self.ref is not None:
                batch.extra["ref_logp"] = self.frozen_forward(
                    lambda: self.chunked(batch, lambda b: response_logprobs(self.ref, b, T)[0]))
        response_texts = [tok.decode(r[:-1] if f else r) for r, f in zip(batch.response_ids, batch.finished.tolist())]
        with self.frozen():
            raw, norm = self.reward.score(batch.prompt_ids, batch.response_ids, prompt_texts, response_texts)
        raw = torch.as_tensor(raw, dtype=torch.float32).to(dev)
        norm = torch.as_tensor(norm, dtype=torch.float32).to(dev)
        check_finite("the rewards", norm, step)
        score = final_scores(norm, batch.finished, rl)
        return Rollout(batch, prompt_texts, response_texts, raw, norm, score, gen_s)

    def rollout_metrics(self, r: Rollout) -> dict[str, float]:
        """Global means over the step's responses."""
        b = r.batch
        n, raw, norm, score, length, eos = global_sums(len(b), r.raw.sum(), r.norm.sum(), r.score.sum(),
                                                       b.response_lengths.sum(), b.finished.float().sum())
        return {"reward_raw": raw / n, "reward": norm / n, "score": score / n, "response_length": length / n,
                "eos_fraction": eos / n, "tokens": length, "gen_s": r.gen_s}

    def write_samples(self, trainer: Trainer, step: int, r: Rollout, n: int = 4) -> None:
        every = self.cfg.rl.sample_every
        if not self.info.is_main or every <= 0 or (step % every != 0 and step + 1 != self.cfg.train.max_steps):
            return
        idx = range(0, len(r.batch), max(1, len(r.batch) // n))
        rows = [{"prompt": r.prompt_texts[i], "response": r.response_texts[i], "reward_raw": float(r.raw[i]),
                 "score": float(r.score[i]), "ended": bool(r.batch.finished[i])} for i in list(idx)[:n]]
        trainer.log.write({"kind": "samples", "step": step + 1, "samples": rows})

    def save(self, trainer: Trainer, result: dict, extra: Optional[dict] = None) -> dict:
        """Rank 0 writes the actor as a Hugging Face model directory + chatforge.json."""
        state = D.full_state_dict(trainer.models["actor"])
        metrics = flatten_metrics(result)
        if self.info.is_main:
            final = D.unwrap(trainer.models["actor"])
            if self.info.enabled and self.cfg.dist.strategy == "fsdp":
                from chatforge.model.hf_causal import fresh_like

                final = fresh_like(self.actor)
                final.load_state_dict(state)
            save_model_dir(final, self.out, self.cfg.model, self.tok)
            rows = [x for x in read_metrics(self.out) if x.get("kind") == "train"]
            if rows:
                for k in ("reward", "reward_raw", "kl"):
                    if k in rows[0]:
                        metrics[f"first_{k}"] = rows[0][k]
            write_run_info(self.out, self.cfg, metrics=metrics, wall_s=time.time() - self.t_start, extra=extra,
                           data={**self.prompts.meta, "tokenizer_fingerprint": self.tok.fingerprint()})
            shown = {k: v for k, v in metrics.items() if k in ("first_reward", "train_reward", "train_kl",
                                                               "train_eos_fraction")}
            print(f"{self.cfg.stage}: done in {time.time() - self.t_start:.0f}s; "
                  + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()) + f"; policy written to {self.out}")
        D.barrier()
        return metrics
