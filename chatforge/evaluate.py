"""Evaluation across stages: gold-judge scores, pairwise win rates, reward-model accuracy and calibration.

Everything here reads model directories and text; the gold judge (chatforge.demo.judge) sees prompt and
response text only. Generation goes through the Engine in batches.

    generate(model, tok, prompts, ...) -> Answers          batched chat answers (text, finished flags)
    mean_se(xs) -> (mean, standard error)
    win_rate(a, b) -> dict                                 pairwise preference by score (ties count half)
    gold_eval_dir(model_dir, prompts, ...) -> dict         sampled (T=1) + greedy gold scores, recorded in
                                                           <dir>/chatforge.json, answers in eval_samples.jsonl
    rm_scores(rm_dir, prompts, responses) -> list[float]   reward-model scores of (prompt, response) texts
    rm_eval_dir(rm_dir, pairs) -> dict                     accuracy vs noise-free gold labels + calibration
    token_nll(model, batches, device, autocast) -> (sum, n) held-out token loss over every rank (pretrain, SFT)

Run-directory records (chatforge.json, digests) are chatforge.rundir's; the names above are re-exported for
the callers that read them here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from chatforge import distributed as D
from chatforge import losses
from chatforge.checkpoint import atomic_write_json, atomic_write_text
from chatforge.demo.judge import JUDGE_VERSION, gold_breakdown, gold_score
from chatforge.engine import Engine
from chatforge.metrics import read_metrics
from chatforge.model.heads import score_sequences
from chatforge.model.load import load_causal_lm, load_scalar_model
from chatforge.rundir import RUN_INFO, file_digest, model_digest, read_run_info, update_run_info  # noqa: F401
from chatforge.tokenizer import ChatTokenizer, render_conversation, render_prompt

EVAL_SAMPLES = "eval_samples.jsonl"


# ----------------------------------------------------------------------------------------------- statistics
def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean); se is 0 for fewer than two values."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    if n < 2:
        return m, 0.0
    var = sum((x - m) ** 2 for x in xs) / (n - 1)
    return m, math.sqrt(var / n)


def clustered_se(xs: Sequence[float], groups: Sequence) -> tuple[float, float]:
    """(mean, standard error of the mean) when values that share a group are correlated (several pairs from
    one prompt): se^2 = G/(G-1) * sum_g (sum_{i in g} (x_i - mean))^2 / n^2 over G groups. One value per group
    gives :func:`mean_se`'s se; identical values within equally large groups give the se of the group means."""
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(xs) / n
    resid: dict = {}
    for x, g in zip(xs, groups, strict=True):
        resid[g] = resid.get(g, 0.0) + (x - m)
    G = len(resid)
    if G < 2:
        return m, 0.0
    return m, math.sqrt(G / (G - 1) * sum(r * r for r in resid.values())) / n


def outcomes(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per prompt: 1 if a's answer scored higher than b's, 0.5 on a tie, 0 if lower."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} scores for A but {len(b)} for B")
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def outcome_counts(results: Sequence[float]) -> dict:
    """{"wins", "ties", "losses", "n"} of per-prompt outcomes (1, 0.5, 0)."""
    return {"wins": sum(o == 1.0 for o in results), "ties": sum(o == 0.5 for o in results),
            "losses": sum(o == 0.0 for o in results), "n": len(results)}


def win_rate(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> dict:
    """How often a beats b, prompt by prompt (a tie counts half), with a normal-approximation interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"win_rate needs two equally long, non-empty score lists (got {len(a)} and {len(b)})")
    results = outcomes(a, b)
    m, se = mean_se(results)
    return {"win_rate": m, "win_rate_se": se, "win_rate_lo": max(0.0, m - z * se), "win_rate_hi": min(1.0, m + z * se),
            **outcome_counts(results)}


# ----------------------------------------------------------------------------------------------- generation
@dataclass
class Answers:
    texts: list[str]
    finished: list[bool]
    lengths: list[int]


def user_messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


@torch.no_grad()
def generate(model: torch.nn.Module, tok: ChatTokenizer, prompts: Sequence[str | list[dict]], *,
             max_new_tokens: int = 48, temperature: float = 1.0, seed: int = 0, batch_size: int = 100,
             top_k: Optional[int] = None, top_p: Optional[float] = None) -> Answers:
    """Answer each prompt in the chat format (engine batches of ``batch_size``); temperature 0 = greedy.

    Generation stops at <|end|> (or <|endoftext|>, which a base model may emit); the stop token is not part
    of the returned text.
    """
    model.eval()
    engine = Engine(model)
    gen = torch.Generator().manual_seed(seed)
    stop = [tok.end_id, tok.eot_id]
    texts, finished, lengths = [], [], []
    for i in range(0, len(prompts), batch_size):
        chunk = [render_prompt(tok, user_messages(p)) for p in prompts[i:i + batch_size]]
        res = engine.generate(chunk, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              stop_ids=stop, pad_id=tok.pad_id, generator=gen)
        for ids, fin in zip(res.tokens, res.finished):
            body = [t for t in ids if t not in stop]
            texts.append(tok.decode(body, skip_special=True).strip())
            finished.append(bool(fin))
            lengths.append(len(ids))
    return Answers(texts, finished, lengths)


# ---------------------------------------------------------------------------------------------- gold scores
def gold_eval_dir(model_dir: str | Path, prompts: Sequence[str], *, max_new_tokens: int = 48, seed: int = 0,
                  batch_size: int = 100, device: str = "cpu", force: bool = False) -> dict:
    """Gold score of a causal LM directory on held-out prompts under sampled (T=1) and greedy decoding.

    Records gold_score, gold_score_se, gold_score_greedy, gold_score_greedy_se (+ the judge's components)
    in ``<dir>/chatforge.json`` and writes every answer with its scores to ``<dir>/eval_samples.jsonl``.
    Skipped (the recorded result returned) when the weights, prompts and settings are unchanged.
    """
    model_dir = Path(model_dir)
    fp = hashlib.sha256(json.dumps([model_digest(model_dir), list(prompts), max_new_tokens, seed,
                                    JUDGE_VERSION]).encode()).hexdigest()[:16]
    info = read_run_info(model_dir)
    if not force and info.get("gold_eval", {}).get("fingerprint") == fp and (model_dir / EVAL_SAMPLES).is_file():
        return info["gold_eval"]
    model, _, tok = load_causal_lm(model_dir, device)
    out: dict = {"fingerprint": fp, "n_prompts": len(prompts), "max_new_tokens": max_new_tokens, "seed": seed}
    rows = [{"prompt": p} for p in prompts]
    for mode, temp in (("sampled", 1.0), ("greedy", 0.0)):
        ans = generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temp, seed=seed,
                       batch_size=batch_size)
        parts = [gold_breakdown(p, r) for p, r in zip(prompts, ans.texts)]
        scores = [b["score"] for b in parts]
        m, se = mean_se(scores)
        suffix = "" if mode == "sampled" else "_greedy"
        out[f"gold_score{suffix}"], out[f"gold_score{suffix}_se"] = m, se
        comps = {k: mean_se([b[k] for b in parts if k in b])[0] for k in ("correct", "follows", "polite", "concise", "ends")}
        out[f"components{suffix}"] = comps
        out[f"finished{suffix}"] = sum(ans.finished) / max(1, len(ans.finished))
        out[f"mean_tokens{suffix}"] = sum(ans.lengths) / max(1, len(ans.lengths))
        for row, text, s in zip(rows, ans.texts, scores):
            row[mode], row[f"gold_{mode}"] = text, s
    atomic_write_text(model_dir / EVAL_SAMPLES, "".join(json.dumps(r) + "\n" for r in rows))
    update_run_info(model_dir, gold_score=out["gold_score"], gold_score_se=out["gold_score_se"],
                    gold_score_greedy=out["gold_score_greedy"], gold_score_greedy_se=out["gold_score_greedy_se"],
                    gold_eval=out)
    return out


def read_eval_samples(model_dir: str | Path) -> list[dict]:
    p = Path(model_dir) / EVAL_SAMPLES
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def pairwise_eval(a_dir: str | Path, b_dir: str | Path, name: str = "win_rate_vs_sft") -> dict:
    """Gold-judge win rate of model a over model b on the same held-out prompts (both decoding modes),
    from their eval_samples.jsonl; recorded in a's chatforge.json under ``name``."""
    a, b = read_eval_samples(a_dir), read_eval_samples(b_dir)
    if not a or len(a) != len(b) or any(x["prompt"] != y["prompt"] for x, y in zip(a, b)):
        raise ValueError(f"{a_dir} and {b_dir} were not evaluated on the same prompts; run gold_eval_dir on both")
    out = {}
    for mode in ("sampled", "greedy"):
        wr = win_rate([r[f"gold_{mode}"] for r in a], [r[f"gold_{mode}"] for r in b])
        out[mode] = wr
    update_run_info(a_dir, **{name: out})
    return out


# ------------------------------------------------------------------------------------------- reward model
@torch.no_grad()
def rm_scores(model: torch.nn.Module, tok: ChatTokenizer, prompts: Sequence[str | list[dict]],
              responses: Sequence[str], batch_size: int = 64) -> list[float]:
    """Reward-model scores of (prompt, response) texts: the score at the final <|end|> of the rendered
    conversation (right-padded batches, read at each row's last real token)."""
    model.eval()
    block = getattr(getattr(model, "cfg", None), "block_size", None)
    seqs = []
    for p, r in zip(prompts, responses):
        ids, _ = render_conversation(tok, user_messages(p) + [{"role": "assistant", "content": r}])
        seqs.append(ids[-block:] if block else ids)
    return score_sequences(model, seqs, tok.pad_id, batch_size).tolist()


@torch.no_grad()
def token_nll(model: torch.nn.Module, batches, device: torch.device, autocast) -> tuple[float, float]:
    """(sum of token losses, token count) of held-out batches, added over every rank (collective).

    ``batches``: tuples (x, y) or (x, y, loss_mask) of (B, T) tensors; ``autocast()``: the training precision."""
    nll = torch.zeros(2, dtype=torch.float64)  # (sum of token losses, token count)
    for batch in batches:
        x, *rest = (t.to(device) for t in batch)
        with autocast():
            loss_sum, n = losses.lm_loss(model(x), *rest)
        nll += torch.tensor([loss_sum.item(), float(n)], dtype=torch.float64)
    total, count = D.all_reduce_sum(nll).tolist()
    return total, count


def calibration(probs: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict]:
    """Reliability table: predicted P(chosen beats rejected) binned vs. how often the gold label agrees."""
    table = []
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        sel = [c for p, c in zip(probs, correct) if lo <= p < hi or (k == bins - 1 and p == 1.0)]
        if sel:
            table.append({"lo": lo, "hi": hi, "n": len(sel), "predicted": (lo + hi) / 2,
                          "observed": sum(sel) / len(sel)})
    return table


def rm_eval_dir(rm_dir: str | Path, pairs: Sequence[dict], *, batch_size: int = 64, device: str = "cpu",
                bins: int = 10) -> dict:
    """Accuracy of a reward model on held-out pairs {"prompt", "chosen", "rejected"} whose labels are the
    gold judge's noise-free preferences; recorded as ``accuracy`` (+ margin, calibration) in rm/chatforge.json.

    Calibration compares p = sigmoid(r_a - r_b) for a random orientation of each pair with the gold label.
    Accuracy is also broken down by the pairs' optional "kind" (the pipeline writes what tells the two answers
    apart: style, content or both) and "gold_gap" (the judge's score difference).
    """
    if not pairs:
        raise ValueError(f"{rm_dir}: no held-out pairs to evaluate the reward model on")
    model, _, tok = load_scalar_model(rm_dir, device)
    prompts = [p["prompt"] for p in pairs]
    rc = rm_scores(model, tok, prompts, [p["chosen"] for p in pairs], batch_size)
    rr = rm_scores(model, tok, prompts, [p["rejected"] for p in pairs], batch_size)
    margins = [c - r for c, r in zip(rc, rr)]
    acc = sum(m > 0 for m in margins) / len(margins)
    # both orientations of every pair: P(first wins) vs. whether the first is the gold winner
    probs = [1 / (1 + math.exp(-m)) for m in margins] + [1 / (1 + math.exp(m)) for m in margins]
    correct = [True] * len(margins) + [False] * len(margins)

    def by(key) -> dict:
        groups: dict[str, list[bool]] = {}
        for p, m in zip(pairs, margins):
            if key(p) is not None:
                groups.setdefault(key(p), []).append(m > 0)
        return {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(groups.items())}

    def gap_bin(p: dict) -> str | None:
        g = p.get("gold_gap")
        return None if g is None else "gap<0.05" if g < 0.05 else "0.05<=gap<0.2" if g < 0.2 else "gap>=0.2"

    # pairs from one prompt are correlated: the standard error counts prompts, not pairs
    keys = [p if isinstance(p, str) else json.dumps(p) for p in prompts]  # a prompt may be a message list
    se = clustered_se([float(m > 0) for m in margins], keys)[1]
    out = {"accuracy": acc, "accuracy_se": se, "n_pairs": len(pairs), "n_prompts": len(set(keys)),
           "margin_mean": sum(margins) / len(margins),
           "accuracy_by_kind": by(lambda p: p.get("kind", "sampled")),
           "accuracy_by_gold_gap": by(gap_bin),
           "calibration": calibration(probs, correct, bins)}
    update_run_info(rm_dir, accuracy=acc, accuracy_se=out["accuracy_se"], heldout_eval=out)
    return out


# ------------------------------------------------------------------------------------ over-optimisation monitor
def ppo_monitor(ppo_dir: str | Path, sft_dir: Optional[str | Path] = None, bins: int = 8) -> dict:
    """Gold score and reward-model score against KL along PPO, from the run's metrics.jsonl.

    PPO logs ``train`` rows (kl, reward = normalised RM score, reward_raw) and ``samples`` rows (a few rollout
    responses with their RM scores). The samples are gold-scored and both series are averaged over ``bins``
    windows of steps, each placed at the mean KL of its steps: the RM score rising while the gold score falls
    is over-optimisation. When ``sft_dir`` has been gold-evaluated, a KL = 0 point anchors the gold curve.
    Written to ``<ppo>/kl_monitor.json`` and chatforge.json ("kl_monitor").
    """
    rows = read_metrics(Path(ppo_dir))
    train = {r["step"]: r for r in rows if r.get("kind") == "train" and isinstance(r.get("kl"), (int, float))}
    samples = [(r["step"], s) for r in rows if r.get("kind") == "samples" for s in r.get("samples", [])]
    if not train or not samples:
        return {}
    last = max(max(train), max(s for s, _ in samples))
    width = max(1, math.ceil(last / bins))
    points = []
    for b in range(bins):
        lo, hi = b * width + 1, (b + 1) * width
        tr = [r for s, r in train.items() if lo <= s <= hi]
        sm = [x for s, x in samples if lo <= s <= hi]
        if not tr or not sm:
            continue
        gold = [gold_score(x["prompt"], x["response"]) for x in sm]
        g, gse = mean_se(gold)
        points.append({"step_lo": lo, "step_hi": hi, "kl": sum(r["kl"] for r in tr) / len(tr),
                       "rm_reward": sum(float(r.get("reward", float("nan"))) for r in tr) / len(tr),
                       "rm_reward_raw": sum(float(r.get("reward_raw", float("nan"))) for r in tr) / len(tr),
                       "sample_rm_raw": sum(float(x.get("reward_raw", float("nan"))) for x in sm) / len(sm),
                       "gold": g, "gold_se": gse, "n_samples": len(sm)})
    out: dict = {"points": points, "bins": bins, "steps_per_bin": width}
    if sft_dir is not None:
        ev = read_run_info(sft_dir).get("gold_eval")
        if ev:
            out["sft_gold"] = ev["gold_score"]
    final = read_run_info(ppo_dir).get("gold_eval")
    if final:
        out["final_gold_heldout"] = final["gold_score"]
    mon = Path(ppo_dir) / "kl_monitor.json"
    if not mon.is_file() or json.loads(mon.read_text()) != json.loads(json.dumps(out)):
        atomic_write_json(mon, out)
    update_run_info(ppo_dir, kl_monitor={"points": len(points), "file": "kl_monitor.json"})
    return out
