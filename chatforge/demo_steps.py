"""The demo world's steps of `chatforge pipeline` (``recipe.data: demo``): generate the world, wire every stage
to its files, sample and judge-label the reward model's pairs, and evaluate with the gold judge.

    demo_data(pipe)          data/: corpus, sft, preferences, rl_prompts, eval_prompts + world.json
    demo_wire(pipe, stage)   the stage's config wired to data/, pairs/ and the run's upstream models
    demo_pairs(pipe)         pairs/train.jsonl (noisy judge labels) and pairs/heldout.jsonl (gold labels)
    demo_eval(pipe)          gold scores, win rates over SFT, RM accuracy vs gold, the over-optimisation monitor

Each takes the :class:`chatforge.pipeline.Pipeline` it runs for; the demo's settings are ``pipe.demo``.
"""

from __future__ import annotations

import itertools
import json
import random
import shutil
import time

from chatforge.checkpoint import atomic_write_json, atomic_write_text
from chatforge.config import Config, ConfigError
from chatforge.errors import UserInputError
from chatforge.rundir import file_digest, model_digest, read_run_info, update_run_info
from chatforge.steps import DIRS, PIPELINE_FILE, StepResult, digest


def demo_data(pipe) -> StepResult:
    """Generate the demo world into data/ (regenerated only when the demo settings or the judge change)."""
    from chatforge.demo.judge import JUDGE_VERSION

    d = pipe.demo
    spec = {"seed": d.seed, "corpus_mb": d.corpus_mb, "n_sft": d.n_sft, "n_pairs": d.n_pairs,
            "n_rl_prompts": d.n_rl_prompts, "n_eval_prompts": d.n_eval_prompts, "label_noise": d.label_noise}
    fp = digest({**spec, "judge": JUDGE_VERSION})  # the variant pairs are labelled by the judge
    meta = pipe.data_dir / "world.json"
    if "data" not in pipe.force and meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp \
            and all(pipe.data_file(k).is_file() for k in ("corpus", "sft", "preferences", "rl_prompts", "eval_prompts")):
        return StepResult("skipped")
    from chatforge.demo.files import write_world

    paths = write_world(pipe.data_dir, **spec)
    files = {k: {"path": str(p), "sha256": file_digest(p), "bytes": p.stat().st_size} for k, p in paths.items()}
    atomic_write_json(meta, {"fingerprint": fp, "spec": spec, "files": files})
    return StepResult("ran", detail={k: v["bytes"] for k, v in files.items()})


def demo_wire(pipe, stage: str) -> tuple[Config, dict]:
    cfg = pipe.stage_config(stage)
    inputs: dict = {}
    pairs = pipe.root / "pairs"
    if stage == "pretrain":
        cfg.data.path = [str(pipe.data_file("corpus"))]
        cfg.tokenizer.path = str(pipe.path("tokenizer"))
        inputs.update(pipe.world_digest("corpus"))
        inputs["tokenizer"] = file_digest(pipe.path("tokenizer") / "tokenizer.json")
    elif stage == "sft":
        cfg.model.init = pipe.need(stage, "pretrain", inputs)
        cfg.tokenizer.path = None
        cfg.data.path = [str(pipe.data_file("sft"))]
        inputs.update(pipe.world_digest("sft"))
    elif stage in ("rm", "dpo"):
        cfg.model.init = pipe.need(stage, "sft", inputs)
        cfg.tokenizer.path = None
        cfg.data.path = [str(pairs / "train.jsonl")]
        if stage == "rm":
            cfg.data.val_path = [str(pairs / "heldout.jsonl")]
        inputs["pairs"] = file_digest(pairs / "train.jsonl")
        inputs["heldout"] = file_digest(pairs / "heldout.jsonl")
    elif stage in ("ppo", "grpo"):
        cfg.model.init = pipe.need(stage, "sft", inputs)
        cfg.rl.reward_model = pipe.need(stage, "rm", inputs)
        cfg.tokenizer.path = None
        cfg.data.path = [str(pipe.data_file("rl_prompts"))]
        inputs.update(pipe.world_digest("rl_prompts"))
    return cfg, inputs


def noisy_judged_pairs(prompts: list[str], answer_sets: list[list[str]], rng: random.Random,
                       noise: float) -> tuple[list[dict], dict]:
    """Every two answers of each prompt, labelled by the gold judge with label noise ``noise`` (empty answers and
    ties dropped) -> (pairs with source "sft_sample", counts of ties, empties and pairs)."""
    from chatforge.demo.preferences import label_pairs

    pairs, stats = [], {"sampled_ties": 0, "sampled_empty": 0}
    for p, answers in zip(prompts, answer_sets):
        for a, b in itertools.combinations(answers, 2):  # every two of the k answers make a pair
            if not a.strip() or not b.strip():
                stats["sampled_empty"] += 1
                continue
            lab = label_pairs(p, a, b, rng, noise)
            if lab is None:
                stats["sampled_ties"] += 1
                continue
            pairs.append({"prompt": p, "chosen": lab[0], "rejected": lab[1], "source": "sft_sample"})
    stats["sampled_pairs"] = len(pairs)
    return pairs, stats


def gold_labelled_pairs(prompts: list[str], answer_sets: list[list[str]]) -> list[dict]:
    """Every two answers of each prompt, labelled by the gold judge without noise (empty answers and ties
    dropped), with the gold gap and the kind of difference (the held-out pairs, built as the training pairs are)."""
    from chatforge.demo.judge import difference_kind, gold_score

    pairs = []
    for p, answers in zip(prompts, answer_sets):
        for a, b in itertools.combinations(answers, 2):
            if not a.strip() or not b.strip():
                continue
            sa, sb = gold_score(p, a), gold_score(p, b)
            if abs(sa - sb) < 1e-9:
                continue
            c, r = (a, b) if sa > sb else (b, a)
            pairs.append({"prompt": p, "chosen": c, "rejected": r, "gold_gap": abs(sa - sb),
                          "kind": difference_kind(p, c, r)})
    return pairs


def demo_pairs(pipe) -> StepResult:
    """RM preference pairs: responses sampled from the SFT model, labelled by the gold judge.

    train.jsonl: every two of ``demo.samples_per_pair_prompt`` samples per training-bucket prompt, label
    noise ``demo.label_noise``, ties dropped, plus the controlled variant pairs of data/preferences.jsonl.
    heldout.jsonl: the same construction on the held-out evaluation prompts, with noise-free gold labels
    (at most ``demo.n_heldout_pairs``, in random order).
    """
    from chatforge.demo.judge import JUDGE_VERSION
    from chatforge.demo.tasks import rl_prompts
    from chatforge.evaluate import generate
    from chatforge.model.load import load_causal_lm

    d, dm = pipe.root / "pairs", pipe.demo
    if not pipe.finished("sft"):
        raise ConfigError(f"the preference pairs need a finished sft/ in {pipe.root}; run --stages sft first "
                          "(or without --stages)")
    spec = {"sft": model_digest(pipe.path("sft")), **pipe.world_digest("preferences", "eval_prompts"),
            "n_sampled": dm.n_sampled_pair_prompts, "k": dm.samples_per_pair_prompt, "n_heldout": dm.n_heldout_pairs, "noise": dm.label_noise,
            "seed": dm.seed, "max_new_tokens": dm.eval_max_new_tokens, "judge": JUDGE_VERSION}
    fp = digest(spec)
    rec = d / PIPELINE_FILE
    if "pairs" not in pipe.force and rec.is_file() and json.loads(rec.read_text()).get("fingerprint") == fp:
        return StepResult("skipped")
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    model, _, tok = load_causal_lm(pipe.path("sft"), pipe.device)

    def sample_k(prompts: list[str], seed: int, k: int = 2) -> list[list[str]]:
        ans = generate(model, tok, [p for p in prompts for _ in range(k)], max_new_tokens=dm.eval_max_new_tokens,
                       temperature=1.0, seed=seed, batch_size=dm.eval_batch_size)
        return [ans.texts[i * k:(i + 1) * k] for i in range(len(prompts))]

    rng = random.Random(f"chatforge-pipeline-pairs-{dm.seed}")
    prompts = rl_prompts(dm.seed + 7919, dm.n_sampled_pair_prompts) if dm.n_sampled_pair_prompts else []
    k = dm.samples_per_pair_prompt
    train, stats = noisy_judged_pairs(prompts, sample_k(prompts, dm.seed + 1, k=k), rng, dm.label_noise)
    variants = [json.loads(line) for line in pipe.data_file("preferences").read_text().splitlines() if line.strip()]
    train += [{**v, "source": "variant"} for v in variants]
    stats["variant_pairs"] = len(variants)
    rng.shuffle(train)

    eval_p = pipe.eval_prompts()
    heldout = gold_labelled_pairs(eval_p, sample_k(eval_p, dm.seed + 2, k=k))
    random.Random(f"chatforge-heldout-pairs-{dm.seed}").shuffle(heldout)
    heldout = heldout[:dm.n_heldout_pairs]  # a random subset when capped
    stats["heldout_pairs"] = len(heldout)
    if not train or not heldout:
        raise UserInputError(f"{d}: the SFT model produced no usable preference pairs ({stats}); "
                         "train SFT longer or raise demo.n_sampled_pair_prompts")
    for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
        atomic_write_text(d / name, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(rec, {"fingerprint": fp, "spec": spec, "stats": stats})
    return StepResult("ran", detail=stats)


def demo_eval(pipe) -> StepResult:
    """Gold scores of every finished policy, PPO/DPO-over-SFT win rates, RM held-out accuracy, and the
    gold-vs-RM-over-KL monitor along PPO."""
    from chatforge.evaluate import gold_eval_dir, pairwise_eval, ppo_monitor, rm_eval_dir

    dm, prompts, out = pipe.demo, pipe.eval_prompts(), {}
    force = "eval" in pipe.force
    for stage in ("pretrain", "sft", "ppo", "dpo"):
        if pipe.finished(stage):
            t0 = time.time()
            r = gold_eval_dir(pipe.path(stage), prompts, max_new_tokens=dm.eval_max_new_tokens, seed=dm.seed,
                              batch_size=dm.eval_batch_size, device=pipe.device, force=force)
            out[DIRS[stage]] = {k: r[k] for k in ("gold_score", "gold_score_se", "gold_score_greedy", "gold_score_greedy_se")}
            pipe.log(f"   {DIRS[stage]:>4}: gold {r['gold_score']:.3f} ± {r['gold_score_se']:.3f} (sampled), "
                     f"{r['gold_score_greedy']:.3f} ± {r['gold_score_greedy_se']:.3f} (greedy)  [{time.time() - t0:.0f}s]")
    for stage in ("ppo", "dpo"):
        if pipe.finished(stage) and pipe.finished("sft"):
            wr = pairwise_eval(pipe.path(stage), pipe.path("sft"))
            s = wr["sampled"]
            out[f"{DIRS[stage]}_win_rate_vs_sft"] = s["win_rate"]
            pipe.log(f"   {DIRS[stage]} over sft: win rate {s['win_rate']:.3f} "
                     f"[{s['win_rate_lo']:.3f}, {s['win_rate_hi']:.3f}] (sampled, ties half)")
    heldout = pipe.root / "pairs" / "heldout.jsonl"
    if pipe.finished("rm") and heldout.is_file():
        info = read_run_info(pipe.path("rm"))
        fp = digest([model_digest(pipe.path("rm")), file_digest(heldout)])
        if force or info.get("heldout_eval", {}).get("fingerprint") != fp:
            pairs = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
            r = rm_eval_dir(pipe.path("rm"), pairs, device=pipe.device)
            r["fingerprint"] = fp
            update_run_info(pipe.path("rm"), heldout_eval=r)
        acc = read_run_info(pipe.path("rm"))["accuracy"]
        out["rm_accuracy"] = acc
        pipe.log(f"   rm: held-out accuracy {acc:.3f} vs noise-free gold labels")
    if pipe.finished("ppo"):
        ppo_monitor(pipe.path("ppo"), pipe.path("sft") if pipe.finished("sft") else None)
    return StepResult("ran", detail=out)
