"""What `chatforge pipeline` reads besides the stages' configs: the recipe (which stages, where the reward model's
comparisons come from, how any recipe is evaluated) and the built-in demo world's settings, each a dataclass with a
docstring under each field, read from the preset YAML's `recipe` and `demo` sections (chatforge.config.load_config
leaves those sections out of every stage's config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from chatforge.config import PIPELINE_SECTIONS, STAGES
from chatforge.config_merge import coerce_lists, merge_layers, read_yaml
from chatforge.errors import ConfigError


@dataclass
class DemoConfig:
    seed: int = 0
    """Seed of the generated demo world."""
    corpus_mb: float = 2.5
    """Size of the generated pretraining corpus."""
    n_sft: int = 4000
    """SFT conversations."""
    n_pairs: int = 3000
    """Controlled variant preference pairs (preferences.jsonl, labelled with `label_noise`); the pipeline adds
    them to the pairs sampled from the SFT model for the reward model (0 = none)."""
    label_noise: float = 0.1
    """Fraction of preference labels flipped."""
    n_rl_prompts: int = 2000
    """RL prompts."""
    n_eval_prompts: int = 400
    """Held-out evaluation prompts (disjoint from every training split)."""
    eval_max_new_tokens: int = 48
    """Length cap of evaluation answers."""
    eval_batch_size: int = 100
    """Prompts generated together (one engine batch) during evaluation and pair sampling."""
    n_sampled_pair_prompts: int = 1500
    """Prompts whose SFT answers make RM training pairs, labelled by the gold judge with `label_noise`
    (ties dropped). 0 = use only the controlled variant pairs."""
    samples_per_pair_prompt: int = 2
    """SFT answers (temperature 1) per such prompt, and per evaluation prompt for the held-out pairs; every two
    of them make a pair (k answers, k(k-1)/2 pairs), as InstructGPT's labellers ranked K answers at once."""
    n_heldout_pairs: int = 400
    """At most this many held-out RM pairs: every two of `samples_per_pair_prompt` SFT samples per evaluation
    prompt, with noise-free gold labels (ties dropped), a random subset when there are more."""
    dpo: bool = False
    """The pipeline also runs the dpo stage (SFT + the same preference pairs) into dpo/."""


@dataclass
class ComparisonsConfig:
    source: str = "file"
    """Where the reward model's comparisons come from: 'file' (stages.rm.data.path, any preference format the
    rm stage reads), 'program' (SFT answers ranked by `ranker`) or 'people' (SFT answers ranked by people in
    <run>/labels/labels.jsonl)."""
    prompts: list[str] = field(default_factory=list)
    """Prompt files whose SFT answers are ranked ('program', 'people'); empty = the RL training prompts."""
    max_prompts: int = 0
    """Rank the answers of at most this many of those prompts (the first ones; 0 = all)."""
    samples_per_prompt: int = 4
    """Answers sampled from the SFT model per prompt, ranked together (k answers make k(k-1)/2 pairs at most)."""
    max_new_tokens: int = 64
    """Length cap of those answers."""
    temperature: float = 1.0
    """Sampling temperature of those answers."""
    seed: int = 0
    """Seed of the sampling."""
    ranker: Optional[str] = None
    """'module:function' of (prompt, responses) -> scores, one number per response, higher is better ('program').
    A prompt is passed as a string (one user message) or as a message list."""
    min_labels: int = 0
    """'people': go on to the reward model once this many prompts are ranked (0 = when every candidate is)."""


@dataclass
class RecipeEvalConfig:
    prompts: list[str] = field(default_factory=list)
    """Evaluation prompt files; empty = `heldout_prompts` RL prompts held out from RL training."""
    heldout_prompts: int = 100
    """When `prompts` is empty: this many RL prompts (a seeded random choice) are kept out of RL for evaluation."""
    max_prompts: int = 200
    """Evaluate on at most this many prompts (the first ones; 0 = all)."""
    max_new_tokens: int = 64
    """Length cap of the evaluation answers (sampled at temperature 1)."""
    batch_size: int = 32
    """Prompts generated together."""
    seed: int = 0
    """Seed of the evaluation sampling and of the held-out split."""
    judge: Optional[str] = None
    """'module:function' of (prompt, response) -> score: a second judge of the win rates over SFT (optional)."""
    side_by_side: int = 12
    """Prompts shown answered side by side in the report."""


@dataclass
class RecipeConfig:
    data: str = "files"
    """'demo' = the built-in demo world (the `demo` section makes every stage's data); 'files' = the files named
    by stages.<stage>.data.path."""
    stages: list[str] = field(default_factory=lambda: ["pretrain", "sft", "rm", "ppo"])
    """Training stages of the recipe, from pretrain, sft, rm, ppo, dpo, grpo (sft with model.init skips pretrain)."""
    comparisons: ComparisonsConfig = field(default_factory=ComparisonsConfig)
    eval: RecipeEvalConfig = field(default_factory=RecipeEvalConfig)


@dataclass
class PipelineConfig:
    """What `chatforge pipeline` reads besides the stages' configs: the YAML's `recipe` and `demo` sections."""

    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)


PIPELINE_CHOICES = {"recipe.data": ("demo", "files"), "recipe.comparisons.source": ("file", "program", "people")}


def load_pipeline_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> PipelineConfig:
    """The YAML's `recipe` and `demo` sections <- ``recipe.*`` / ``demo.*`` overrides (dotlist entries)."""
    schema = OmegaConf.structured(PipelineConfig)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        raw = read_yaml(path)
        layers.append((str(path), {k: raw[k] for k in PIPELINE_SECTIONS if k in raw}))
    layers.append(("command line", OmegaConf.from_dotlist(coerce_lists(schema, overrides or []))))
    cfg: PipelineConfig = merge_layers(schema, layers)
    for key, choices in PIPELINE_CHOICES.items():
        value = OmegaConf.select(OmegaConf.structured(cfg), key)
        if value not in choices:
            raise ConfigError(f"bad value for '{key}': {value!r}; choose one of {', '.join(choices)}")
    bad = [s for s in cfg.recipe.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"recipe.stages: unknown stage '{bad[0]}'; choose from {', '.join(STAGES)}")
    return cfg
