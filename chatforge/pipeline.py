"""The whole recipe in one command: demo data -> tokenizer -> base -> sft -> pairs -> rm -> ppo (-> dpo) -> eval
-> report, into one run directory (DESIGN.md "Run directories").

Every step is a function of its inputs, recorded as a *fingerprint*: the stage's resolved config (paths
blanked, progress flags dropped), the digests of its data files and of its upstream models' weights. A step
whose finished output records the same fingerprint is skipped; a stage folder holding a checkpoint written
for the same fingerprint is resumed (the stage's Trainer continues from its checkpoint); anything else is
wiped and rerun. ``force`` reruns the named steps and everything downstream of them.

    <run>/data/          the demo world (corpus, sft, preferences, rl_prompts, eval_prompts)  + world.json
    <run>/tokenizer/     BPE trained on the corpus                                            + pipeline.json
    <run>/base|sft|rm|ppo|dpo/   model directories (chatforge.json records the fingerprint under "pipeline")
    <run>/pairs/         RM pairs sampled from the SFT model: train.jsonl (noisy labels), heldout.jsonl (gold)
    <run>/pipeline.json  per-step status and wall time of the last call
    <run>/report.md, plots/

One YAML holds every stage: shared sections at the top, ``stages.<stage>`` per stage. Overrides apply to every
stage, or to one when written ``stages.<stage>.<section>.<key>=value``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from chatforge.checkpoint import atomic_write_json, atomic_write_text
from chatforge.config import STAGES as CONFIG_STAGES
from chatforge.config import Config, ConfigError, DemoConfig, load_config, to_dict
from chatforge.evaluate import file_digest, model_digest, read_run_info, update_run_info

TRAIN_STAGES = ("pretrain", "sft", "rm", "ppo", "dpo")
DIRS = {"pretrain": "base", "sft": "sft", "rm": "rm", "ppo": "ppo", "dpo": "dpo"}
STEPS = ("data", "tokenizer", "pretrain", "sft", "pairs", "rm", "ppo", "dpo", "eval", "report")
UPSTREAM = {"data": [], "tokenizer": ["data"], "pretrain": ["tokenizer"], "sft": ["pretrain"], "pairs": ["sft"],
            "rm": ["pairs"], "ppo": ["rm", "sft"], "dpo": ["pairs"], "eval": ["pretrain", "sft", "rm", "ppo", "dpo"],
            "report": ["eval"]}
ALIASES = {"base": "pretrain"}
PIPELINE_FILE = "pipeline.json"
VOLATILE = {("train", "progress"), ("train", "threads"), ("train", "device"), ("model", "init"), ("tokenizer", "path"), ("data", "path"),
            ("data", "val_path"), ("rl", "reward_model"), ("train", "trackers")}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def downstream(step: str) -> list[str]:
    """``step`` and every step that depends on it, in pipeline order."""
    out = {step}
    for s in STEPS:
        if any(u in out for u in UPSTREAM[s]):
            out.add(s)
    return [s for s in STEPS if s in out]


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Dotlist entries -> (shared, {stage: entries}); ``stages.ppo.rl.kl_coef=0.2`` goes to ppo only."""
    shared: list[str] = []
    per: dict[str, list[str]] = {}
    for o in overrides:
        if o.startswith("stages."):
            parts = o.split(".", 2)
            if len(parts) < 3 or parts[1] not in CONFIG_STAGES:
                raise ConfigError(f"override '{o}': expected stages.<stage>.<section>.<key>=value with a stage in "
                                  f"{', '.join(CONFIG_STAGES)}")
            per.setdefault(parts[1], []).append(parts[2])
        else:
            shared.append(o)
    return shared, per


def config_fingerprint(cfg: Config) -> dict:
    """The config as a stage's input: paths (covered by data/model digests) and display flags removed."""
    d = to_dict(cfg)
    for section, key in VOLATILE:
        d.get(section, {}).pop(key, None)
    d.pop("demo", None)  # the demo section shapes the data, which is fingerprinted by its files
    return d


@dataclass
class StepResult:
    status: str  # "ran", "resumed", "skipped"
    wall_s: float = 0.0
    detail: dict = field(default_factory=dict)


class Pipeline:
    """Runs the steps of one run directory (see the module docstring)."""

    def __init__(self, config: Optional[str | Path], out: str | Path, overrides: Optional[list[str]] = None,
                 stages: Optional[list[str]] = None, force: Optional[list[str]] = None, verbose: bool = True,
                 device: str = "cpu"):
        self.config_path = str(config) if config else None
        self.root = Path(out)
        self.shared, self.per_stage = split_overrides(list(overrides or []))
        self.verbose = verbose
        self.demo: DemoConfig = self.stage_config("pretrain").demo
        self.device = device
        enabled = [s for s in TRAIN_STAGES if s != "dpo" or self.demo.dpo]
        if stages:
            wanted = [ALIASES.get(s, s) for s in stages]
            bad = [s for s in wanted if s not in STEPS]
            if bad:
                raise ConfigError(f"--stages: unknown stage(s) {', '.join(bad)}; choose from "
                                  f"{', '.join(('base',) + STEPS)}")
            self.selected = [s for s in STEPS if s in wanted]
        else:
            self.selected = [s for s in STEPS if s in enabled or s not in TRAIN_STAGES]
        if not self.demo.dpo and "dpo" in self.selected and not stages:
            self.selected.remove("dpo")
        self.force: set[str] = set()
        for f in force or []:
            f = ALIASES.get(f, f)
            if f not in STEPS:
                raise ConfigError(f"--force: unknown stage '{f}'; choose from {', '.join(('base',) + STEPS)}")
            self.force.update(downstream(f))
        self.results: dict[str, StepResult] = {}

    # ---- helpers ---------------------------------------------------------------------------------------------

    def log(self, msg: str) -> None:
        if self.verbose:
            print(msg, flush=True)

    def stage_config(self, stage: str) -> Config:
        return load_config(stage, self.config_path, self.shared + self.per_stage.get(stage, []))

    def path(self, step: str) -> Path:
        return self.root / DIRS.get(step, step)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def data_file(self, name: str) -> Path:
        return self.data_dir / {"corpus": "corpus.txt", "sft": "sft.jsonl", "preferences": "preferences.jsonl",
                                "rl_prompts": "rl_prompts.jsonl", "eval_prompts": "eval_prompts.jsonl"}[name]

    def finished(self, step: str) -> bool:
        d = self.path(step)
        return (d / "chatforge.json").is_file() and (d / "model.safetensors").is_file()

    def eval_prompts(self) -> list[str]:
        lines = self.data_file("eval_prompts").read_text().splitlines()
        return [json.loads(line)["prompt"] for line in lines if line.strip()]

    # ---- steps -----------------------------------------------------------------------------------------------

    def step_data(self) -> StepResult:
        """Generate the demo world into data/ (regenerated only when the demo settings or the judge change)."""
        from chatforge.demo.judge import JUDGE_VERSION

        d = self.demo
        spec = {"seed": d.seed, "corpus_mb": d.corpus_mb, "n_sft": d.n_sft, "n_pairs": d.n_pairs,
                "n_rl_prompts": d.n_rl_prompts, "n_eval_prompts": d.n_eval_prompts, "label_noise": d.label_noise}
        fp = digest({**spec, "judge": JUDGE_VERSION})  # the variant pairs are labelled by the judge
        meta = self.data_dir / "world.json"
        if "data" not in self.force and meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp \
                and all(self.data_file(k).is_file() for k in ("corpus", "sft", "preferences", "rl_prompts", "eval_prompts")):
            return StepResult("skipped")
        from chatforge.demo.files import write_world

        paths = write_world(self.data_dir, **spec)
        files = {k: {"path": str(p), "sha256": file_digest(p), "bytes": p.stat().st_size} for k, p in paths.items()}
        atomic_write_json(meta, {"fingerprint": fp, "spec": spec, "files": files})
        return StepResult("ran", detail={k: v["bytes"] for k, v in files.items()})

    def data_digest(self, *names: str) -> dict:
        meta = json.loads((self.data_dir / "world.json").read_text())
        return {n: meta["files"][n]["sha256"] for n in names}

    def step_tokenizer(self) -> StepResult:
        """Train the BPE tokenizer on the corpus into tokenizer/."""
        from chatforge.data.pretrain import corpus_files, iter_documents
        from chatforge.tokenizer import train_tokenizer

        cfg = self.stage_config("pretrain")
        fp = digest({"corpus": self.data_digest("corpus"), "vocab_size": cfg.tokenizer.vocab_size})
        d = self.path("tokenizer")
        rec = d / PIPELINE_FILE
        if "tokenizer" not in self.force and rec.is_file() and json.loads(rec.read_text()).get("fingerprint") == fp \
                and (d / "tokenizer.json").is_file():
            return StepResult("skipped")
        shutil.rmtree(d, ignore_errors=True)
        tok = train_tokenizer(iter_documents(corpus_files([str(self.data_file("corpus"))])), cfg.tokenizer.vocab_size)
        tok.save(d, model_max_length=cfg.model.block_size)
        atomic_write_json(rec, {"fingerprint": fp, "vocab_size": tok.vocab_size, "tokenizer_sha256": file_digest(d / "tokenizer.json")})
        return StepResult("ran", detail={"vocab_size": tok.vocab_size})

    def wire(self, stage: str) -> tuple[Config, dict]:
        """The stage's config with its inputs wired to the run directory, and the digests of those inputs."""
        cfg = self.stage_config(stage)
        inputs: dict = {}
        pairs = self.root / "pairs"

        def need(up: str) -> str:
            if not self.finished(up):
                raise ConfigError(f"stage {stage} needs a finished {DIRS[up]}/ in {self.root}; run "
                                  f"--stages {up} first (or without --stages)")
            inputs[f"model_{DIRS[up]}"] = model_digest(self.path(up))
            return str(self.path(up))

        if stage == "pretrain":
            cfg.data.path = [str(self.data_file("corpus"))]
            cfg.tokenizer.path = str(self.path("tokenizer"))
            inputs.update(self.data_digest("corpus"))
            inputs["tokenizer"] = file_digest(self.path("tokenizer") / "tokenizer.json")
        elif stage == "sft":
            cfg.model.init = need("pretrain")
            cfg.tokenizer.path = None
            cfg.data.path = [str(self.data_file("sft"))]
            inputs.update(self.data_digest("sft"))
        elif stage in ("rm", "dpo"):
            cfg.model.init = need("sft")
            cfg.tokenizer.path = None
            cfg.data.path = [str(pairs / "train.jsonl")]
            if stage == "rm":
                cfg.data.val_path = [str(pairs / "heldout.jsonl")]
            inputs["pairs"] = file_digest(pairs / "train.jsonl")
            inputs["heldout"] = file_digest(pairs / "heldout.jsonl")
        elif stage == "ppo":
            cfg.model.init = need("sft")
            cfg.rl.reward_model = need("rm")
            cfg.tokenizer.path = None
            cfg.data.path = [str(self.data_file("rl_prompts"))]
            inputs.update(self.data_digest("rl_prompts"))
        return cfg, inputs

    def step_train(self, stage: str) -> StepResult:
        """Run one training stage: skip when finished with the same fingerprint, resume when its checkpoint
        belongs to the same fingerprint, else start over in a clean folder."""
        import importlib

        cfg, inputs = self.wire(stage)
        fp = digest({"stage": stage, "config": config_fingerprint(cfg), "inputs": inputs})
        d = self.path(stage)
        info = read_run_info(d)
        if stage not in self.force and self.finished(stage) and info.get("pipeline", {}).get("fingerprint") == fp:
            return StepResult("skipped", detail={"fingerprint": fp})
        rec = d / PIPELINE_FILE
        resuming = (stage not in self.force and rec.is_file() and not self.finished(stage)
                    and json.loads(rec.read_text()).get("fingerprint") == fp)
        if not resuming:
            if d.exists():
                self.log(f"   {DIRS[stage]}/: inputs changed or forced; starting over")
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            atomic_write_json(rec, {"fingerprint": fp, "inputs": inputs, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
        else:
            self.log(f"   {DIRS[stage]}/: resuming from its checkpoint")
        module = importlib.import_module(f"chatforge.stages.{stage}")
        metrics = module.run(cfg, d)
        update_run_info(d, pipeline={"fingerprint": fp, "inputs": inputs})
        return StepResult("resumed" if resuming else "ran", detail={"fingerprint": fp, "metrics": metrics})

    def step_pairs(self) -> StepResult:
        """RM preference pairs: responses sampled from the SFT model, labelled by the gold judge.

        train.jsonl: every two of ``demo.samples_per_pair_prompt`` samples per training-bucket prompt, label
        noise ``demo.label_noise``, ties dropped, plus the controlled variant pairs of data/preferences.jsonl.
        heldout.jsonl: the same construction on the held-out evaluation prompts, with noise-free gold labels
        (at most ``demo.n_heldout_pairs``, in random order).
        """
        from chatforge.demo.judge import JUDGE_VERSION, difference_kind, gold_score
        from chatforge.demo.preferences import label_pairs
        from chatforge.demo.tasks import rl_prompts
        from chatforge.evaluate import generate
        from chatforge.model.load import load_causal_lm

        d, dm = self.root / "pairs", self.demo
        if not self.finished("sft"):
            raise ConfigError(f"the preference pairs need a finished sft/ in {self.root}; run --stages sft first "
                              "(or without --stages)")
        spec = {"sft": model_digest(self.path("sft")), **self.data_digest("preferences", "eval_prompts"),
                "n_sampled": dm.n_sampled_pair_prompts, "k": dm.samples_per_pair_prompt, "n_heldout": dm.n_heldout_pairs, "noise": dm.label_noise,
                "seed": dm.seed, "max_new_tokens": dm.eval_max_new_tokens, "judge": JUDGE_VERSION}
        fp = digest(spec)
        rec = d / PIPELINE_FILE
        if "pairs" not in self.force and rec.is_file() and json.loads(rec.read_text()).get("fingerprint") == fp:
            return StepResult("skipped")
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        model, _, tok = load_causal_lm(self.path("sft"), self.device)

        def sample_k(prompts: list[str], seed: int, k: int = 2) -> list[list[str]]:
            ans = generate(model, tok, [p for p in prompts for _ in range(k)], max_new_tokens=dm.eval_max_new_tokens,
                           temperature=1.0, seed=seed, batch_size=dm.eval_batch_size)
            return [ans.texts[i * k:(i + 1) * k] for i in range(len(prompts))]

        rng = random.Random(f"chatforge-pipeline-pairs-{dm.seed}")
        train, stats = [], {"sampled_ties": 0, "sampled_empty": 0}
        prompts = rl_prompts(dm.seed + 7919, dm.n_sampled_pair_prompts) if dm.n_sampled_pair_prompts else []
        k = dm.samples_per_pair_prompt
        for p, answers in zip(prompts, sample_k(prompts, dm.seed + 1, k=k)):
            for a, b in itertools.combinations(answers, 2):  # every two of the k answers make a pair
                if not a.strip() or not b.strip():
                    stats["sampled_empty"] += 1
                    continue
                lab = label_pairs(p, a, b, rng, dm.label_noise)
                if lab is None:
                    stats["sampled_ties"] += 1
                    continue
                train.append({"prompt": p, "chosen": lab[0], "rejected": lab[1], "source": "sft_sample"})
        stats["sampled_pairs"] = len(train)
        variants = [json.loads(line) for line in self.data_file("preferences").read_text().splitlines() if line.strip()]
        train += [{**v, "source": "variant"} for v in variants]
        stats["variant_pairs"] = len(variants)
        rng.shuffle(train)

        heldout = []  # built as the training pairs are (every two of k answers), labelled without noise
        eval_p = self.eval_prompts()
        for p, answers in zip(eval_p, sample_k(eval_p, dm.seed + 2, k=k)):
            for a, b in itertools.combinations(answers, 2):
                if not a.strip() or not b.strip():
                    continue
                sa, sb = gold_score(p, a), gold_score(p, b)
                if abs(sa - sb) < 1e-9:
                    continue
                c, r = (a, b) if sa > sb else (b, a)
                heldout.append({"prompt": p, "chosen": c, "rejected": r, "gold_gap": abs(sa - sb),
                                "kind": difference_kind(p, c, r)})
        random.Random(f"chatforge-heldout-pairs-{dm.seed}").shuffle(heldout)
        heldout = heldout[:dm.n_heldout_pairs]  # a random subset when capped
        stats["heldout_pairs"] = len(heldout)
        if not train or not heldout:
            raise ValueError(f"{d}: the SFT model produced no usable preference pairs ({stats}); "
                             "train SFT longer or raise demo.n_sampled_pair_prompts")
        for name, rows in (("train.jsonl", train), ("heldout.jsonl", heldout)):
            atomic_write_text(d / name, "".join(json.dumps(r) + "\n" for r in rows))
        atomic_write_json(rec, {"fingerprint": fp, "spec": spec, "stats": stats})
        return StepResult("ran", detail=stats)

    def step_eval(self) -> StepResult:
        """Gold scores of every finished policy, PPO/DPO-over-SFT win rates, RM held-out accuracy, and the
        gold-vs-RM-over-KL monitor along PPO."""
        from chatforge.evaluate import gold_eval_dir, pairwise_eval, ppo_monitor, rm_eval_dir

        dm, prompts, out = self.demo, self.eval_prompts(), {}
        force = "eval" in self.force
        for stage in ("pretrain", "sft", "ppo", "dpo"):
            if self.finished(stage):
                t0 = time.time()
                r = gold_eval_dir(self.path(stage), prompts, max_new_tokens=dm.eval_max_new_tokens, seed=dm.seed,
                                  batch_size=dm.eval_batch_size, device=self.device, force=force)
                out[DIRS[stage]] = {k: r[k] for k in ("gold_score", "gold_score_se", "gold_score_greedy", "gold_score_greedy_se")}
                self.log(f"   {DIRS[stage]:>4}: gold {r['gold_score']:.3f} ± {r['gold_score_se']:.3f} (sampled), "
                         f"{r['gold_score_greedy']:.3f} ± {r['gold_score_greedy_se']:.3f} (greedy)  [{time.time() - t0:.0f}s]")
        for stage in ("ppo", "dpo"):
            if self.finished(stage) and self.finished("sft"):
                wr = pairwise_eval(self.path(stage), self.path("sft"))
                s = wr["sampled"]
                out[f"{DIRS[stage]}_win_rate_vs_sft"] = s["win_rate"]
                self.log(f"   {DIRS[stage]} over sft: win rate {s['win_rate']:.3f} "
                         f"[{s['win_rate_lo']:.3f}, {s['win_rate_hi']:.3f}] (sampled, ties half)")
        heldout = self.root / "pairs" / "heldout.jsonl"
        if self.finished("rm") and heldout.is_file():
            info = read_run_info(self.path("rm"))
            fp = digest([model_digest(self.path("rm")), file_digest(heldout)])
            if force or info.get("heldout_eval", {}).get("fingerprint") != fp:
                pairs = [json.loads(line) for line in heldout.read_text().splitlines() if line.strip()]
                r = rm_eval_dir(self.path("rm"), pairs, device=self.device)
                r["fingerprint"] = fp
                update_run_info(self.path("rm"), heldout_eval=r)
            acc = read_run_info(self.path("rm"))["accuracy"]
            out["rm_accuracy"] = acc
            self.log(f"   rm: held-out accuracy {acc:.3f} vs noise-free gold labels")
        if self.finished("ppo"):
            ppo_monitor(self.path("ppo"), self.path("sft") if self.finished("sft") else None)
        return StepResult("ran", detail=out)

    def step_report(self) -> StepResult:
        from chatforge.report import build_report

        path = build_report(self.root)
        return StepResult("ran", detail={"report": str(path)})

    # ---- driver ------------------------------------------------------------------------------------------------

    def needed_steps(self) -> list[str]:
        """The selected steps plus the cheap prerequisites they need (data, tokenizer, pairs)."""
        need = set(self.selected)
        if need & {"tokenizer", "pretrain", "sft", "pairs", "rm", "ppo", "dpo", "eval"}:
            need |= {"data", "tokenizer"}
        if need & {"rm", "dpo"}:
            need.add("pairs")
        return [s for s in STEPS if s in need]

    def run(self) -> dict[str, StepResult]:
        self.root.mkdir(parents=True, exist_ok=True)
        threads = self.stage_config("pretrain").train.threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        t_all = time.time()
        for step in self.needed_steps():
            if step == "dpo" and not self.demo.dpo and "dpo" not in self.selected:
                continue
            self.log(f"== {step}")
            t0 = time.time()
            fn: Callable[[], StepResult]
            if step in TRAIN_STAGES:
                res = self.step_train(step)
            else:
                res = getattr(self, f"step_{step}")()
            res.wall_s = time.time() - t0
            self.results[step] = res
            self.log(f"   {step}: {res.status} ({res.wall_s:.1f}s)")
            self._write_status(time.time() - t_all)
        return self.results

    def _write_status(self, total: float) -> None:
        prev = {}
        p = self.root / PIPELINE_FILE
        if p.is_file():
            prev = json.loads(p.read_text()).get("steps", {})
        for k, r in self.results.items():
            entry = {"status": r.status, "wall_s": round(r.wall_s, 2)}
            if r.status != "skipped" or k not in prev:
                prev[k] = entry
            else:
                prev[k] = {**prev[k], "last_status": "skipped"}
        atomic_write_json(p, {"config": self.config_path, "overrides": self.shared,
                              "stage_overrides": self.per_stage, "steps": prev, "last_call_s": round(total, 2)})


def run_pipeline(config: Optional[str | Path], out: str | Path, overrides: Optional[list[str]] = None,
                 stages: Optional[list[str]] = None, force: Optional[list[str]] = None, verbose: bool = True) -> dict:
    """Run (or finish) a pipeline; returns {step: StepResult}."""
    return Pipeline(config, out, overrides, stages, force, verbose).run()
