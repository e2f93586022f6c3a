"""Reward sources for RL (PPO, GRPO, RLOO) and ``chatforge score``: a reward model or a Python function.

Both expose one call, so callers never branch::

    raw, norm = reward.score(prompt_ids, response_ids, prompt_texts, response_texts)  # (N,), (N,) fp32 CPU

- :class:`RewardModelScorer` (``--rl.reward_model=RM_DIR``, a ``chatforge rm`` output) scores token
  ids: ``prompt_ids[i] + response_ids[i]`` is read at its last token (the response's ``<|end|>``
  when it finished), exactly as the RM was trained. ``norm = (raw - mean) / std`` with the
  statistics the rm stage stored in ``RM_DIR/chatforge.json`` (``reward_norm``).
- :class:`FunctionReward` (``--rl.reward_fn=module:function``) calls ``function(prompt, response)
  -> float`` on texts; ``norm`` is ``raw`` (a programmatic reward has its own scale).

A NaN or infinite reward is an error naming the source and the offending item.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from chatforge.config import ConfigError
from chatforge.errors import ChatforgeError
from chatforge import distributed as D
from chatforge.data.chunks import call_overhead_tokens, plan_chunks
from chatforge.data.pairs import PromptRows, branch_rows
from chatforge.model.heads import ScalarModel, branch_scores, score_sequences
from chatforge.model.load import load_scalar_model
from chatforge.rundir import RUN_INFO
from chatforge.tokenizer import ChatTokenizer, render_prompt, render_response


class RewardError(ChatforgeError, ValueError):
    """A reward source cannot be built or returned an unusable value."""


class RewardSource(Protocol):
    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
              prompt_texts: Sequence[Any], response_texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw (N,), normalised (N,)) fp32 CPU tensors."""
        ...


def _check_finite(raw: torch.Tensor, what: str) -> None:
    bad = (~torch.isfinite(raw)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"{what} returned a non-finite reward ({raw[bad[0]].item()}) for {len(bad)} of "
                          f"{len(raw)} responses (first: item {bad[0]})")


class RewardModelScorer:
    """A frozen reward model from an ``rm/`` directory, with its normalisation statistics.

    ``normalize=False`` accepts a directory without ``reward_norm`` (e.g. a reward model trained
    elsewhere) and returns raw scores as the normalised ones.
    """

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", *, batch_size: int = 32,
                 normalize: bool = True, trust_remote_code: bool = False):
        self.path = Path(path)
        model, self.cfg, self.tokenizer = load_scalar_model(self.path, device, trust_remote_code=trust_remote_code)
        self.model = model.float().eval().requires_grad_(False)
        self.batch_size = batch_size
        self.pad_id = self.tokenizer.pad_id
        self.block_size = self.cfg.block_size
        self.mean, self.std = 0.0, 1.0
        norm = self._read_norm() if normalize else None
        if norm is not None:
            self.mean, self.std = float(norm["mean"]), float(norm["std"])
        elif normalize:
            raise RewardError(f"{self.path / RUN_INFO}: no 'reward_norm' statistics; not a chatforge rm/ output "
                              f"(train one with `chatforge rm`, or use raw scores: `chatforge score --raw`, normalize=False)")
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std > 0):
            raise RewardError(f"{self.path / RUN_INFO}: bad reward_norm mean={self.mean} std={self.std}")

    def _read_norm(self) -> Optional[dict]:
        f = self.path / RUN_INFO
        if not f.is_file():
            return None
        try:
            info = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise RewardError(f"{f}: invalid JSON at line {e.lineno}: {e.msg}") from None
        norm = info.get("reward_norm")
        return norm if isinstance(norm, dict) and "mean" in norm and "std" in norm else None

    def check_tokenizer(self, tok: ChatTokenizer) -> None:
        """Raise if the policy's tokenizer is not the reward model's (the ids would mean other text)."""
        if tok.fingerprint() != self.tokenizer.fingerprint():
            raise RewardError(
                f"the policy's tokenizer (vocab {tok.vocab_size}) differs from the reward model's in {self.path} "
                f"(vocab {self.tokenizer.vocab_size}); train the reward model from the same SFT model (or "
                f"tokenizer) as the policy")

    @torch.inference_mode()
    def score_ids(self, prompt_ids: Sequence[Sequence[int]],
                  response_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw (N,), normalised (N,)) fp32 CPU scores of ``prompt_ids[i] + response_ids[i]``.

        Each sequence is right-padded and read at its last real token, in length-sorted batches of at most
        ``batch_size`` (chatforge/data/chunks.py). A sequence longer than the RM's context keeps its last
        ``block_size`` tokens (the end, where the reward is read). Where prompts repeat (GRPO's groups) and every
        sequence fits, a native reward model reads a row per prompt with its responses branching from it, the
        prompt computed once (``model.heads.branch_scores``), at most ``batch_size`` prompts per pass.
        """
        if len(prompt_ids) != len(response_ids):
            raise ValueError(f"score_ids: {len(prompt_ids)} prompts but {len(response_ids)} responses")
        seqs = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        seqs = [s[-self.block_size:] for s in seqs]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("score_ids: an empty prompt+response sequence")
        raw = torch.empty(len(seqs), dtype=torch.float32)  # (N,)
        device = next(self.model.parameters()).device  # read each call: the model may be offloaded
        shared = len({tuple(p) for p in prompt_ids}) < len(prompt_ids)  # e.g. GRPO's groups of samples per prompt
        fits = all(len(p) + len(r) <= self.block_size for p, r in zip(prompt_ids, response_ids))
        if shared and fits and D.bare(self.model, ScalarModel) is not None:  # each prompt computed once
            rows = branch_rows(list(zip(prompt_ids, response_ids)), self.pad_id)
            for start in range(0, len(rows.ids), self.batch_size):  # at most batch_size prompt rows per pass
                part = torch.arange(start, min(start + self.batch_size, len(rows.ids)))  # (g,) these rows
                mine = torch.isin(rows.row, part).nonzero().squeeze(1)  # (u,) the sequences they hold
                sub = PromptRows(rows.ids[part], rows.branches[part], rows.row[mine] - start, rows.last[mine],
                                 rows.lengths[mine])
                raw[mine] = branch_scores(self.model, sub.to(device)).cpu()  # (u,)
        else:
            over = call_overhead_tokens(device)
            for rows in plan_chunks([len(s) for s in seqs], [0] * len(seqs), self.batch_size, over):  # length-sorted
                raw[rows] = score_sequences(self.model, [seqs[i] for i in rows], self.pad_id, len(rows))  # (b,)
        _check_finite(raw, f"reward model {self.path}")
        return raw, (raw - self.mean) / self.std

    def score_text(self, prompts: Sequence[Any], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Score texts: a prompt is a user message string or a message list; rendered in the chat format."""
        p_ids = [render_prompt(self.tokenizer, [{"role": "user", "content": p}] if isinstance(p, str) else list(p))
                 for p in prompts]
        r_ids = [render_response(self.tokenizer, r) for r in responses]
        return self.score_ids(p_ids, r_ids)

    def score(self, prompt_ids, response_ids, prompt_texts=None, response_texts=None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.score_ids(prompt_ids, response_ids)


class FunctionReward:
    """A programmatic reward ``module:function`` with ``function(prompt: str, response: str) -> float``."""

    def __init__(self, spec: str):
        self.spec = spec
        self.fn = import_function(spec)
        self.model = None

    def score_text(self, prompts: Sequence[Any], responses: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw (N,), raw (N,)): the function's values, twice (no normalisation)."""
        if len(prompts) != len(responses):
            raise ValueError(f"score_text: {len(prompts)} prompts but {len(responses)} responses")
        vals = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            v = self.fn(p, r)
            try:
                vals.append(float(v))
            except (TypeError, ValueError):
                raise RewardError(f"reward function {self.spec} returned {type(v).__name__} {v!r} for item {i}; "
                                  f"it must return a number") from None
        raw = torch.tensor(vals, dtype=torch.float32)
        _check_finite(raw, f"reward function {self.spec}")
        return raw, raw.clone()

    def score(self, prompt_ids=None, response_ids=None, prompt_texts=None, response_texts=None):
        if prompt_texts is None or response_texts is None:
            raise ValueError(f"reward function {self.spec} scores texts: pass prompt_texts and response_texts")
        return self.score_text(prompt_texts, response_texts)


def import_function(spec: str) -> Callable:
    """'package.module:function' -> the callable, with an error naming the spec."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ConfigError(f"reward function '{spec}' must look like 'package.module:function'")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"reward function '{spec}': cannot import module '{module}' ({e})") from None
    fn = mod
    for part in name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ConfigError(f"reward function '{spec}': module '{module}' has no attribute '{name}'")
    if not callable(fn):
        raise ConfigError(f"reward function '{spec}': '{name}' is not callable")
    return fn


def load_reward(rl_cfg, device: torch.device | str = "cpu") -> RewardSource:
    """The reward source named by ``rl.reward_model`` or ``rl.reward_fn`` (exactly one must be given)."""
    if (rl_cfg.reward_model is None) == (rl_cfg.reward_fn is None):
        raise ConfigError("give exactly one of --rl.reward_model=RM_DIR or --rl.reward_fn=module:function")
    if rl_cfg.reward_model is not None:
        return RewardModelScorer(rl_cfg.reward_model, device)
    return FunctionReward(rl_cfg.reward_fn)
