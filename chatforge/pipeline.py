"""Any recipe in one command: data -> tokenizer -> base -> sft -> comparisons -> rm -> ppo (dpo, grpo) -> eval ->
report, into one run directory (DESIGN.md "Run directories").

The recipe (the YAML's ``recipe`` section, :class:`chatforge.config.RecipeConfig`) names the training stages and
where each stage's data comes from: ``recipe.data: demo`` generates the built-in demo world (the ``demo``
section) and wires every stage to it; ``recipe.data: files`` reads the user's files named by
``stages.<stage>.data.path``. The reward model's comparisons come from a preference file, from SFT answers
ranked by a program, or from SFT answers ranked by people (``recipe.comparisons``; chatforge/comparisons.py). The demo world's own steps live in
chatforge/demo_steps.py, the evaluation of any other recipe in chatforge/recipe_eval.py.

Every step is a function of its inputs, recorded as a *fingerprint*: the stage's resolved config (paths
blanked, progress flags dropped), the digests of its data files and of its upstream models' weights. A step
whose finished output records the same fingerprint is skipped; a stage folder holding a checkpoint written
for the same fingerprint is resumed (the stage's Trainer continues from its checkpoint); anything else is
wiped and rerun. ``force`` reruns the named steps and everything downstream of them.

    <run>/data/          demo: the generated world + world.json; files: the RL/evaluation prompt split + recipe.json
    <run>/tokenizer/     BPE trained on the pretraining text                                  + pipeline.json
    <run>/base|sft|rm|ppo|dpo|grpo/  model directories (chatforge.json records the fingerprint under "pipeline")
    <run>/pairs/         the RM's comparisons: train.jsonl (+ demo: heldout.jsonl with gold labels)
    <run>/labels/        people's rankings: candidates.jsonl (written here), labels.jsonl (written by people)
    <run>/pipeline.json  the recipe, per-step status and wall time of the last call
    <run>/report.md, plots/

One YAML holds every stage: shared sections at the top, ``stages.<stage>`` per stage, and the pipeline's own
``recipe`` and ``demo`` sections. Overrides apply to every stage, or to one when written
``stages.<stage>.<section>.<key>=value``; ``recipe.*`` and ``demo.*`` overrides go to the pipeline.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Optional

from chatforge.checkpoint import atomic_write_json, atomic_write_text
from chatforge.config import STAGES as CONFIG_STAGES
from chatforge.config import (PIPELINE_SECTIONS, Config, ConfigError, DemoConfig, PipelineConfig, load_config,
                              load_pipeline_config, to_dict)
from chatforge.rundir import file_digest, model_digest, read_run_info, update_run_info
from chatforge.steps import (DIRS, EXIT_WAITING, PIPELINE_FILE, StepResult, WaitingForLabels,  # noqa: F401
                             data_digest, digest, path_digest)

TRAIN_STAGES = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")
STEPS = ("data", "tokenizer", "pretrain", "sft", "pairs", "rm", "ppo", "dpo", "grpo", "eval", "report")
UPSTREAM = {"data": [], "tokenizer": ["data"], "pretrain": ["tokenizer"], "sft": ["pretrain"], "pairs": ["sft"],
            "rm": ["pairs"], "ppo": ["rm", "sft"], "dpo": ["pairs"], "grpo": ["rm", "sft"],
            "eval": ["pretrain", "sft", "rm", "ppo", "dpo", "grpo"], "report": ["eval"]}
ALIASES = {"base": "pretrain", "comparisons": "pairs"}
VOLATILE = {("train", "progress"), ("train", "restart"), ("train", "threads"), ("train", "device"), ("model", "init"), ("tokenizer", "path"), ("data", "path"),
            ("data", "val_path"), ("rl", "reward_model")}


def downstream(step: str) -> list[str]:
    """``step`` and every step that depends on it, in pipeline order."""
    out = {step}
    for s in STEPS:
        if any(u in out for u in UPSTREAM[s]):
            out.add(s)
    return [s for s in STEPS if s in out]


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Dotlist entries -> (shared, {stage: entries}); ``stages.ppo.rl.kl_coef=0.2`` goes to ppo only.
    ``recipe.*`` / ``demo.*`` entries are the pipeline's (see :func:`pipeline_overrides`) and left out."""
    shared: list[str] = []
    per: dict[str, list[str]] = {}
    for o in overrides:
        if o.split(".", 1)[0] in PIPELINE_SECTIONS:
            continue
        if o.startswith("stages."):
            parts = o.split(".", 2)
            if len(parts) < 3 or parts[1] not in CONFIG_STAGES:
                raise ConfigError(f"override '{o}': expected stages.<stage>.<section>.<key>=value with a stage in "
                                  f"{', '.join(CONFIG_STAGES)}")
            per.setdefault(parts[1], []).append(parts[2])
        else:
            shared.append(o)
    return shared, per


def pipeline_overrides(overrides: list[str]) -> list[str]:
    """The ``recipe.*`` and ``demo.*`` entries of a dotlist."""
    return [o for o in overrides if o.split(".", 1)[0] in PIPELINE_SECTIONS]


# Config fields added after run directories existed, each with the value that gives the behaviour from before it
# existed: at that value a field is left out of the fingerprint, so adding a field does not rerun finished stages.
SINCE_ADDED = {("data", "val_split"): "tail", ("data", "mixture"): []}
# Fields that cannot change a stage's result (where caches live, how a corpus is cut into shards; the pipeline
# trains the tokenizer in its own step, so the pretrain stage's sample size is never used).
VOLATILE |= {("data", "cache_dir"), ("data", "shard_tokens"), ("tokenizer", "sample_chars")}


def config_fingerprint(cfg: Config) -> dict:
    """The config as a stage's input: paths (covered by data/model digests) and display flags removed."""
    d = to_dict(cfg)
    for section, key in VOLATILE:
        d.get(section, {}).pop(key, None)
    for (section, key), before in SINCE_ADDED.items():
        if d.get(section, {}).get(key, before) == before:
            d.get(section, {}).pop(key, None)
    d.pop("demo", None)  # (older configs carried the demo section; the demo's data is fingerprinted by its files)
    return d


class Pipeline:
    """Runs the steps of one run directory (see the module docstring)."""

    def __init__(self, config: Optional[str | Path], out: str | Path, overrides: Optional[list[str]] = None,
                 stages: Optional[list[str]] = None, force: Optional[list[str]] = None, verbose: bool = True,
                 device: str = "cpu"):
        self.config_path = str(config) if config else None
        self.root = Path(out)
        overrides = list(overrides or [])
        self.shared, self.per_stage = split_overrides(overrides)
        self.pcfg: PipelineConfig = load_pipeline_config(self.config_path, pipeline_overrides(overrides))
        self.recipe = self.pcfg.recipe
        self.demo: DemoConfig = self.pcfg.demo
        self.is_demo = self.recipe.data == "demo"
        self.verbose = verbose
        self.device = device
        self.notes: list[str] = []
        self.plan = self._plan()
        enabled = [s for s in STEPS if s in self.plan or s not in TRAIN_STAGES]
        if "tokenizer" not in self.plan:
            enabled.remove("tokenizer")
        if "pairs" not in self.plan:
            enabled.remove("pairs")
        if stages:
            wanted = [ALIASES.get(s, s) for s in stages]
            bad = [s for s in wanted if s not in STEPS]
            if bad:
                raise ConfigError(f"--stages: unknown stage(s) {', '.join(bad)}; choose from "
                                  f"{', '.join(('base',) + STEPS)}")
            self.selected = [s for s in STEPS if s in wanted]
        else:
            self.selected = enabled
        self.force: set[str] = set()
        for f in force or []:
            f = ALIASES.get(f, f)
            if f not in STEPS:
                raise ConfigError(f"--force: unknown stage '{f}'; choose from {', '.join(('base',) + STEPS)}")
            self.force.update(downstream(f))
        self.results: dict[str, StepResult] = {}
        self.waiting: Optional[str] = None

    # ---- the recipe's plan -----------------------------------------------------------------------------------

    def _plan(self) -> list[str]:
        """The recipe's training stages plus its tokenizer/pairs steps, checked before any work: a missing file,
        an unknown stage or a stage without its required input is one line naming the stage and the key."""
        train = list(dict.fromkeys(self.recipe.stages))
        if self.is_demo and self.demo.dpo and "dpo" not in train:
            train.append("dpo")
        if "sft" in train and "pretrain" in train and self.stage_config("sft").model.init:
            train.remove("pretrain")
            self.notes.append("sft starts from stages.sft.model.init: no tokenizer or pretrain steps")
        plan = [s for s in TRAIN_STAGES if s in train]
        if not self.is_demo:
            self._check_files(plan)
        steps = list(plan)
        if "pretrain" in plan:
            pre = self.stage_config("pretrain")
            if self.is_demo or not (pre.tokenizer.path or pre.model.init):
                steps.append("tokenizer")
        if ("rm" in plan or "dpo" in plan) and (self.is_demo or self.recipe.comparisons.source != "file"):
            steps.append("pairs")
        return steps

    def _check_files(self, plan: list[str]) -> None:
        def need_paths(stage: str, paths: list[str], key: str, what: str) -> None:
            if not paths:
                raise ConfigError(f"stage {stage}: {key} is empty; name {what}")
            for p in paths:
                if not Path(p).exists():
                    raise ConfigError(f"stage {stage}: {key}: no such file or folder '{p}'")

        def need_dir(stage: str, path: Optional[str], key: str) -> None:
            if path and not Path(path).is_dir():
                raise ConfigError(f"stage {stage}: {key}: no such model directory '{path}'")

        comp = self.recipe.comparisons
        for stage in plan:
            cfg = self.stage_config(stage)
            key = f"stages.{stage}"
            need_dir(stage, cfg.model.init, f"{key}.model.init")
            if stage == "pretrain":
                need_paths(stage, cfg.data.path, f"{key}.data.path", "the pretraining text files")
            elif stage == "sft":
                need_paths(stage, cfg.data.path, f"{key}.data.path", "the demonstration files")
            elif stage in ("rm", "dpo") and comp.source == "file":
                paths = cfg.data.path or (self.stage_config("rm").data.path if stage == "dpo" else [])
                need_paths(stage, paths, f"{key}.data.path", "the preference files (recipe.comparisons.source=file)")
            elif stage in ("ppo", "grpo"):
                need_paths(stage, cfg.data.path, f"{key}.data.path", "the RL prompt files")
                if "rm" not in plan and not (cfg.rl.reward_model or cfg.rl.reward_fn):
                    raise ConfigError(f"stage {stage}: no reward: add rm to recipe.stages, or set "
                                      f"{key}.rl.reward_model (an RM directory) or {key}.rl.reward_fn")
                if "rm" in plan and cfg.rl.reward_fn:
                    raise ConfigError(f"stage {stage}: {key}.rl.reward_fn is set but the recipe trains a reward "
                                      f"model (rm in recipe.stages); keep one of them")
                need_dir(stage, None if "rm" in plan else cfg.rl.reward_model, f"{key}.rl.reward_model")
            if stage != "pretrain" and not cfg.model.init and not self._upstream_model(stage, plan):
                first = "pretrain" if stage == "sft" else "sft"
                raise ConfigError(f"stage {stage}: no starting model: add {first} to recipe.stages or set "
                                  f"{key}.model.init")
        if ("rm" in plan or "dpo" in plan) and comp.source != "file":
            if comp.source == "program" and not comp.ranker:
                raise ConfigError("stage rm: recipe.comparisons.source=program needs recipe.comparisons.ranker "
                                  "(module:function of prompt, responses -> scores)")
            if comp.prompts:
                need_paths("rm", comp.prompts, "recipe.comparisons.prompts", "the prompts whose answers are ranked")
            elif not self.rl_stage(plan):
                raise ConfigError("stage rm: recipe.comparisons.prompts is empty and the recipe has no ppo/grpo "
                                  "prompts to take them from")
            if comp.samples_per_prompt < 2:
                raise ConfigError("stage rm: recipe.comparisons.samples_per_prompt must be >= 2 (answers to rank)")
        for p in self.recipe.eval.prompts:
            if not Path(p).exists():
                raise ConfigError(f"stage eval: recipe.eval.prompts: no such file or folder '{p}'")

    def _upstream_model(self, stage: str, plan: list[str]) -> Optional[str]:
        """The run's own model this stage starts from: sft <- base, the later stages <- sft."""
        up = "pretrain" if stage == "sft" else "sft" if stage != "pretrain" else None
        return up if up in plan else None

    def rl_stage(self, plan: Optional[list[str]] = None) -> Optional[str]:
        plan = self.plan if plan is None else plan
        return next((s for s in ("ppo", "grpo") if s in plan), None)

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

    def eval_prompts(self) -> list:
        p = self.data_file("eval_prompts")
        if not p.is_file():
            return []
        lines = p.read_text().splitlines()
        return [json.loads(line)["prompt"] for line in lines if line.strip()]

    # ---- steps -----------------------------------------------------------------------------------------------

    def step_data(self) -> StepResult:
        if self.is_demo:
            from chatforge.demo_steps import demo_data

            return demo_data(self)
        return self.step_recipe_data()

    def step_recipe_data(self) -> StepResult:
        """The user's files: the RL prompts split into RL training and evaluation prompts (when the recipe
        evaluates on a held-out share of them), written to data/ with their digests in data/recipe.json."""
        from chatforge.data.prompts import read_prompts

        ev, rl = self.recipe.eval, self.rl_stage()
        rl_paths = self.stage_config(rl).data.path if rl else []
        spec = {"eval_prompts": data_digest(ev.prompts) if ev.prompts else None,
                "rl_prompts": data_digest(rl_paths) if rl_paths else None, "heldout": ev.heldout_prompts,
                "max_prompts": ev.max_prompts, "seed": ev.seed}
        fp = digest(spec)
        meta = self.data_dir / "recipe.json"
        if "data" not in self.force and meta.is_file():
            rec = json.loads(meta.read_text())
            if rec.get("fingerprint") == fp and all(self.data_file(k).is_file() for k in rec.get("stats", {})):
                return StepResult("skipped")
        self.data_dir.mkdir(parents=True, exist_ok=True)

        def as_json(p) -> object:  # one user message -> a string (the demo's and most files' form)
            m = p.messages
            return m[0]["content"] if len(m) == 1 and m[0]["role"] == "user" else m

        def write(name: str, prompts: list) -> None:
            atomic_write_text(self.data_file(name), "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

        stats: dict = {}
        for name in ("rl_prompts", "eval_prompts"):
            self.data_file(name).unlink(missing_ok=True)
        if ev.prompts:
            evp = [as_json(p) for p in read_prompts(ev.prompts)]
        elif rl_paths:
            rlp = [as_json(p) for p in read_prompts(rl_paths)]
            n = min(ev.heldout_prompts, len(rlp) // 2)
            held = set(random.Random(f"chatforge-eval-split-{ev.seed}").sample(range(len(rlp)), n))
            evp = [p for i, p in enumerate(rlp) if i in held]
            write("rl_prompts", [p for i, p in enumerate(rlp) if i not in held])
            stats["rl_prompts"] = len(rlp) - n
        else:
            evp = []
        if ev.max_prompts:
            evp = evp[:ev.max_prompts]
        if evp:
            write("eval_prompts", evp)
            stats["eval_prompts"] = len(evp)
        atomic_write_json(meta, {"fingerprint": fp, "spec": spec, "stats": stats})
        return StepResult("ran", detail=stats)

    def world_digest(self, *names: str) -> dict:
        """The digests of demo world files (data/world.json)."""
        meta = json.loads((self.data_dir / "world.json").read_text())
        return {n: meta["files"][n]["sha256"] for n in names}

    def step_tokenizer(self) -> StepResult:
        """Train the BPE tokenizer on the pretraining text into tokenizer/."""
        from chatforge.config import TokenizerConfig
        from chatforge.data.sources import corpus_files, tokenizer_sample
        from chatforge.tokenizer import train_tokenizer

        cfg = self.stage_config("pretrain")
        if self.is_demo:
            paths, corpus = [str(self.data_file("corpus"))], self.world_digest("corpus")
        else:
            paths = cfg.data.path
            corpus = {"corpus": data_digest(paths)}
        spec = {"corpus": corpus, "vocab_size": cfg.tokenizer.vocab_size}
        if cfg.tokenizer.sample_chars != TokenizerConfig.sample_chars:  # (the default's runs keep their fingerprint)
            spec["sample_chars"] = cfg.tokenizer.sample_chars
        fp = digest(spec)
        d = self.path("tokenizer")
        rec = d / PIPELINE_FILE
        if "tokenizer" not in self.force and rec.is_file() and json.loads(rec.read_text()).get("fingerprint") == fp \
                and (d / "tokenizer.json").is_file():
            return StepResult("skipped")
        shutil.rmtree(d, ignore_errors=True)
        tok = train_tokenizer(tokenizer_sample(corpus_files(paths), cfg.tokenizer.sample_chars), cfg.tokenizer.vocab_size)
        tok.save(d, model_max_length=cfg.model.block_size)
        atomic_write_json(rec, {"fingerprint": fp, "vocab_size": tok.vocab_size, "tokenizer_sha256": file_digest(d / "tokenizer.json")})
        return StepResult("ran", detail={"vocab_size": tok.vocab_size})

    def need(self, stage: str, up: str, inputs: dict) -> str:
        """The path of a finished upstream model of the run, its digest added to ``inputs``."""
        if not self.finished(up):
            raise ConfigError(f"stage {stage} needs a finished {DIRS[up]}/ in {self.root}; run "
                              f"--stages {up} first (or without --stages)")
        inputs[f"model_{DIRS[up]}"] = model_digest(self.path(up))
        return str(self.path(up))

    def wire(self, stage: str) -> tuple[Config, dict]:
        """The stage's config with its inputs wired to the run directory, and the digests of those inputs."""
        if self.is_demo:
            from chatforge.demo_steps import demo_wire

            return demo_wire(self, stage)
        return self.wire_files(stage)

    def wire_files(self, stage: str) -> tuple[Config, dict]:
        cfg = self.stage_config(stage)
        inputs: dict = {}
        up = self._upstream_model(stage, self.plan)
        if up:
            cfg.model.init = self.need(stage, up, inputs)
            cfg.tokenizer.path = None
        elif cfg.model.init:
            inputs["model_init"] = path_digest(cfg.model.init)
        if stage == "pretrain" and "tokenizer" in self.plan:
            cfg.tokenizer.path = str(self.path("tokenizer"))
            inputs["tokenizer"] = file_digest(self.path("tokenizer") / "tokenizer.json")
        if stage in ("rm", "dpo"):
            if "pairs" in self.plan:
                pairs = self.root / "pairs" / "train.jsonl"
                if not pairs.is_file():
                    raise ConfigError(f"stage {stage} needs the comparisons in {pairs}; run --stages pairs first "
                                      "(or without --stages)")
                cfg.data.path = [str(pairs)]
            elif stage == "dpo" and not cfg.data.path:
                cfg.data.path = list(self.stage_config("rm").data.path)
        if stage in ("ppo", "grpo"):
            if "rm" in self.plan:
                cfg.rl.reward_model = self.need(stage, "rm", inputs)
            elif cfg.rl.reward_model:
                inputs["reward_model"] = path_digest(cfg.rl.reward_model)
            if self.data_file("rl_prompts").is_file():  # the RL prompts less the held-out evaluation prompts
                cfg.data.path = [str(self.data_file("rl_prompts"))]
        if cfg.data.path:
            inputs["data"] = data_digest(cfg.data.path)
        if cfg.data.val_path:
            inputs["val_data"] = data_digest(cfg.data.val_path)
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
        """The reward model's comparisons: the demo's judge-labelled pairs, or SFT answers ranked by a program
        or by people (chatforge/comparisons.py)."""
        if self.is_demo:
            from chatforge.demo_steps import demo_pairs

            return demo_pairs(self)
        from chatforge.comparisons import build_comparisons

        return build_comparisons(self)

    def sampling_model(self) -> str:
        """The SFT model whose answers are ranked: the run's sft/, else the rm (or dpo) stage's model.init."""
        if "sft" in self.plan:
            if not self.finished("sft"):
                raise ConfigError(f"the comparisons need a finished sft/ in {self.root}; run --stages sft first "
                                  "(or without --stages)")
            return str(self.path("sft"))
        for stage in ("rm", "dpo"):
            if stage in self.plan and self.stage_config(stage).model.init:
                return self.stage_config(stage).model.init
        raise ConfigError("stage rm: no SFT model to sample the answers to rank: add sft to recipe.stages or "
                          "set stages.rm.model.init")

    def step_eval(self) -> StepResult:
        """The demo: gold-judge scores; any other recipe: reward-model (and judge) scores, lengths, endings, KL
        to the SFT model and win rates over it (chatforge/recipe_eval.py)."""
        if self.is_demo:
            from chatforge.demo_steps import demo_eval

            return demo_eval(self)
        from chatforge.recipe_eval import evaluate_run

        return StepResult("ran", detail=evaluate_run(self))

    def step_report(self) -> StepResult:
        from chatforge.report import build_report

        path = build_report(self.root)
        return StepResult("ran", detail={"report": str(path)})

    # ---- driver ------------------------------------------------------------------------------------------------

    def needed_steps(self) -> list[str]:
        """The selected steps plus the cheap prerequisites they need (data, tokenizer, pairs)."""
        need = set(self.selected)
        if need - {"report"}:
            need.add("data")
        if need & {"tokenizer", "pretrain", "sft", "pairs", "rm", "ppo", "dpo", "grpo", "eval"} and "tokenizer" in self.plan:
            need.add("tokenizer")
        if need & {"rm", "dpo"} and "pairs" in self.plan:
            need.add("pairs")
        return [s for s in STEPS if s in need]

    def run(self) -> dict[str, StepResult]:
        """Run the needed steps in order; stops early (status "waiting", ``self.waiting`` holds the message)
        when the recipe waits for people's rankings."""
        self.root.mkdir(parents=True, exist_ok=True)
        threads = self.stage_config("pretrain").train.threads
        if threads:
            import torch

            torch.set_num_threads(threads)
        for note in self.notes:
            self.log(f"note: {note}")
        t_all = time.time()
        for step in self.needed_steps():
            self.log(f"== {step}")
            t0 = time.time()
            try:
                if step in TRAIN_STAGES:
                    res = self.step_train(step)
                else:
                    res = getattr(self, f"step_{step}")()
            except WaitingForLabels as e:
                self.waiting = str(e)
                res = StepResult("waiting", detail={"message": str(e)})
            res.wall_s = time.time() - t0
            self.results[step] = res
            self.log(f"   {step}: {res.status} ({res.wall_s:.1f}s)")
            self._write_status(time.time() - t_all)
            if self.waiting:
                break
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
                              "stage_overrides": self.per_stage, "recipe": to_dict(self.pcfg.recipe),
                              "plan": self.plan, "steps": prev, "last_call_s": round(total, 2)})


def run_pipeline(config: Optional[str | Path], out: str | Path, overrides: Optional[list[str]] = None,
                 stages: Optional[list[str]] = None, force: Optional[list[str]] = None, verbose: bool = True) -> dict:
    """Run (or finish) a pipeline; returns {step: StepResult}."""
    return Pipeline(config, out, overrides, stages, force, verbose).run()
