"""Evaluation of any recipe (the demo has its gold judge instead; chatforge/pipeline.py ``demo_eval``).

On the run's evaluation prompts (data/eval_prompts.jsonl), every finished policy (base, sft, ppo, dpo, grpo)
answers each prompt once, sampled at temperature 1; then, per model:

    rm_score       mean reward-model score (normalised with the RM's stored statistics) ± standard error
    judge_score    mean score of the recipe's judge function (recipe.eval.judge), when named
    length         mean response length in tokens (± SE); ends: share of answers that end (<|end|>)
    kl_to_sft      mean over answers of sum_t [log pi(y_t) - log pi_sft(y_t)] (nats per answer, ± SE), on the
                   model's own samples (a Monte-Carlo estimate of KL(pi || pi_sft)); needs the SFT tokenizer
    win rates      each later model's answer against SFT's, prompt by prompt, judged by the reward model and by
                   the judge (ties count half), with a 95% interval

Answers are cached per (model weights, prompts, settings) in <run>/eval/<model>.jsonl; the figures go to
<run>/eval/results.json, which the report reads. The SFT model is the run's sft/, or the model RL started from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch

from chatforge.checkpoint import atomic_write_json, atomic_write_text
from chatforge.evaluate import mean_se, user_messages, win_rate

POLICIES = ("pretrain", "sft", "ppo", "dpo", "grpo")


@torch.no_grad()
def sample_answers(model, tok, prompts: Sequence, *, max_new_tokens: int, seed: int, batch_size: int) -> list[dict]:
    """One answer per prompt at temperature 1: text, token ids (with the stop token when it ended), the sum of
    the model's log-probs of those ids, and whether it ended."""
    from chatforge.engine import Engine
    from chatforge.tokenizer import render_prompt

    model.eval()
    engine, gen, stop = Engine(model), torch.Generator().manual_seed(seed), [tok.end_id, tok.eot_id]
    rows = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        res = engine.generate([render_prompt(tok, user_messages(p)) for p in chunk], max_new_tokens,
                              temperature=1.0, stop_ids=stop, pad_id=tok.pad_id, generator=gen, return_logprobs=True)
        for p, ids, lps, fin in zip(chunk, res.tokens, res.logprobs, res.finished):
            text = tok.decode([t for t in ids if t not in stop], skip_special=True).strip()
            rows.append({"prompt": p, "response": text, "ids": list(ids), "logp": float(sum(lps)),
                         "finished": bool(fin), "tokens": len(ids)})
    return rows


@torch.no_grad()
def answer_logprobs(model, tok, prompts: Sequence, answers: Sequence[Sequence[int]], batch_size: int = 16) -> list[float]:
    """sum_t log p(answer_t | prompt, answer_<t) under ``model`` for each (prompt, answer ids)."""
    from chatforge.data.batching import pad
    from chatforge.losses import token_logprobs
    from chatforge.tokenizer import render_prompt

    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for i in range(0, len(answers), batch_size):
        heads = [render_prompt(tok, user_messages(p)) for p in prompts[i:i + batch_size]]
        seqs = [h + list(a) for h, a in zip(heads, answers[i:i + batch_size])]
        idx = pad(seqs, tok.pad_id, "right").to(device)  # (B, T); right padding: real tokens unaffected
        lp = token_logprobs(model(idx)[:, :-1], idx[:, 1:])  # (B, T-1): log p(idx[t+1] | idx[:t+1])
        for row, h, s in zip(lp, heads, seqs):
            out.append(float(row[len(h) - 1:len(s) - 1].sum()))
    return out


def _answers(pipe, name: str, model_dir: str, prompts: list, folder: Path) -> list[dict]:
    from chatforge.model.load import load_causal_lm
    from chatforge.steps import digest, path_digest

    ev = pipe.recipe.eval
    fp = digest([path_digest(model_dir), prompts, ev.max_new_tokens, ev.seed])
    path, meta = folder / f"{name}.jsonl", folder / f"{name}.json"
    if "eval" not in pipe.force and meta.is_file() and path.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    model, _, tok = load_causal_lm(model_dir, pipe.device)
    rows = sample_answers(model, tok, prompts, max_new_tokens=ev.max_new_tokens, seed=ev.seed, batch_size=ev.batch_size)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(meta, {"fingerprint": fp, "model": str(model_dir), "tokenizer": tok.fingerprint()})
    return rows


def _stats(xs: list[float], key: str) -> dict:
    m, se = mean_se(xs)
    return {key: m, f"{key}_se": se}


def reference_models(pipe) -> tuple[Optional[str], Optional[str]]:
    """(the SFT model, the reward model) of the run: its own sft/ and rm/, else what RL started from / used."""
    rl = pipe.rl_stage()
    sft = str(pipe.path("sft")) if pipe.finished("sft") else None
    rm = str(pipe.path("rm")) if pipe.finished("rm") else None
    for stage in ([rl] if rl else []) + [s for s in ("dpo",) if s in pipe.plan]:
        cfg = pipe.stage_config(stage)
        sft = sft or cfg.model.init
        if stage == rl:
            rm = rm or cfg.rl.reward_model
    return sft, rm


def evaluate_run(pipe) -> dict:
    """Evaluate every finished policy of a (non-demo) pipeline run; writes <run>/eval/results.json."""
    from chatforge.model.load import load_causal_lm
    from chatforge.steps import DIRS
    from chatforge.rl.reward import RewardModelScorer, import_function

    ev, prompts = pipe.recipe.eval, pipe.eval_prompts()
    folder = pipe.root / "eval"
    if not prompts:
        pipe.log("   no evaluation prompts (set recipe.eval.prompts, or add ppo/grpo prompts to hold some out)")
        return {"skipped": "no evaluation prompts"}
    folder.mkdir(parents=True, exist_ok=True)
    sft_dir, rm_dir = reference_models(pipe)
    models = {DIRS[s]: str(pipe.path(s)) for s in POLICIES if pipe.finished(s)}
    if sft_dir and "sft" not in models:
        models = {"sft": sft_dir, **models}
    answers = {name: _answers(pipe, name, d, prompts, folder) for name, d in models.items()}
    res: dict = {name: {"n": len(rows), **_stats([float(r["tokens"]) for r in rows], "length"),
                        "ends": sum(r["finished"] for r in rows) / len(rows)} for name, rows in answers.items()}
    scores: dict[str, dict[str, list[float]]] = {name: {} for name in answers}
    if rm_dir:
        norm = (Path(rm_dir) / "chatforge.json").is_file() and "reward_norm" in json.loads((Path(rm_dir) / "chatforge.json").read_text())
        scorer = RewardModelScorer(rm_dir, pipe.device, normalize=norm)
        for name, rows in answers.items():
            scores[name]["rm"] = scorer.score_text([r["prompt"] for r in rows], [r["response"] for r in rows])[1].tolist()
            res[name].update(_stats(scores[name]["rm"], "rm_score"))
        del scorer
    if ev.judge:
        judge = import_function(ev.judge)
        for name, rows in answers.items():
            scores[name]["judge"] = [float(judge(r["prompt"], r["response"])) for r in rows]
            res[name].update(_stats(scores[name]["judge"], "judge_score"))
    if "sft" in answers:
        meta = {n: json.loads((folder / f"{n}.json").read_text())["tokenizer"] for n in answers}
        others = [n for n in answers if n != "sft" and meta[n] == meta["sft"]]
        if others:
            ref, _, tok = load_causal_lm(models["sft"], pipe.device)
            for name in others:
                rows = answers[name]
                ref_lp = answer_logprobs(ref, tok, [r["prompt"] for r in rows], [r["ids"] for r in rows])
                res[name].update(_stats([r["logp"] - q for r, q in zip(rows, ref_lp)], "kl_to_sft"))
        res["sft"].update({"kl_to_sft": 0.0, "kl_to_sft_se": 0.0})
        for name in answers:
            if name in ("sft", "base"):
                continue
            for by in ("rm", "judge"):
                if by in scores[name]:
                    res[name][f"win_rate_vs_sft_{by}"] = win_rate(scores[name][by], scores["sft"][by])
    side = []
    for i in range(min(ev.side_by_side, len(prompts))):
        side.append({"prompt": prompts[i], **{n: {"response": answers[n][i]["response"],
                                                  **{by: s[by][i] for by in s}} for n, s in scores.items()}})
    out = {"n_prompts": len(prompts), "reward_model": rm_dir, "judge": ev.judge, "sft": sft_dir, "models": res,
           "side_by_side": side, "max_new_tokens": ev.max_new_tokens, "seed": ev.seed}
    atomic_write_json(folder / "results.json", out)
    for name, r in res.items():
        parts = [f"{k} {r[k]:.3f} ± {r[k + '_se']:.3f}" for k in ("rm_score", "judge_score", "kl_to_sft", "length") if k in r]
        pipe.log(f"   {name:>4}: " + ", ".join(parts) + f", ends {r['ends']:.2f}")
    return {n: {k: v for k, v in r.items() if not isinstance(v, dict)} for n, r in res.items()}
