"""Any recipe in one command: data -> tokenizer -> base -> sft -> comparisons -> rm -> ppo (dpo, grpo) -> eval ->
report, into one run directory (DESIGN.md "Run directories").

The recipe (the YAML's ``recipe`` section, :class:`chatforge.recipe_config.RecipeConfig`) names the training stages and
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

This file holds the :class:`Pipeline` that runs the steps; the step graph lives in chatforge/pipeline_graph.py, the
overrides and config fingerprints in chatforge/pipeline_config.py, the recipe's plan and its checks in
chatforge/recipe_plan.py, and the data and wiring steps of a files recipe in chatforge/recipe_steps.py.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

from chatforge.checkpoint import atomic_write_json
from chatforge.config import Config, ConfigError, load_config, to_dict
from chatforge.recipe_config import DemoConfig, PipelineConfig, load_pipeline_config
from chatforge.pipeline_config import config_fingerprint, pipeline_overrides, split_overrides
from chatforge.pipeline_graph import ALIASES, STEPS, TRAIN_STAGES, downstream
from chatforge.recipe_plan import recipe_plan
from chatforge.recipe_steps import recipe_data, wire_files
from chatforge.rundir import file_digest, model_digest, read_run_info, update_run_info
from chatforge.steps import (DIRS, EXIT_WAITING, PIPELINE_FILE, StepResult, WaitingForLabels,  # noqa: F401
                             data_digest, digest)


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
        self.plan = recipe_plan(self)
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
        return recipe_data(self)

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
        return wire_files(self, stage)

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
