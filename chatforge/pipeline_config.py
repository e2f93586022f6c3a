"""How the pipeline's one YAML and its overrides become each stage's config, and the config part of a stage's
fingerprint: :func:`split_overrides` (shared vs ``stages.<stage>.`` entries), :func:`pipeline_overrides`
(``recipe.*``/``demo.*`` entries) and :func:`config_fingerprint` (paths and display flags removed)."""

from __future__ import annotations

from chatforge.config import STAGES as CONFIG_STAGES
from chatforge.config import PIPELINE_SECTIONS, Config, ConfigError, to_dict

VOLATILE = {("train", "progress"), ("train", "restart"), ("train", "threads"), ("train", "device"), ("model", "init"), ("tokenizer", "path"), ("data", "path"),
            ("data", "val_path"), ("rl", "reward_model")}
# Fields that cannot change a stage's result (where its rows are also logged, where caches live, how a corpus is cut into shards; the pipeline
# trains the tokenizer in its own step, so the pretrain stage's sample size is never used).
VOLATILE |= {("data", "cache_dir"), ("data", "shard_tokens"), ("tokenizer", "sample_chars"), ("train", "trackers")}
# Config fields added after run directories existed, each with the value that gives the behaviour from before it
# existed: at that value a field is left out of the fingerprint, so adding a field does not rerun finished stages.
# A stage that does not read a field's section (an SFT run and the rl section) leaves it out at any value.
SINCE_ADDED = {("data", "val_split"): "tail", ("data", "mixture"): [], ("rm", "pair_weighting"): "pair",
               ("rl", "missing_eos_mode"): "replace", ("rl", "weight_decay"): None, ("rl", "grpo_eps"): 1e-6}
SECTION_READERS = {"rl": ("ppo", "grpo"), "rm": ("rm",), "dpo": ("dpo",), "sft": ("sft",)}


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


def config_fingerprint(cfg: Config) -> dict:
    """The config as a stage's input: paths (covered by data/model digests) and display flags removed."""
    d = to_dict(cfg)
    for section, key in VOLATILE:
        d.get(section, {}).pop(key, None)
    for (section, key), before in SINCE_ADDED.items():
        unread = cfg.stage not in SECTION_READERS.get(section, (cfg.stage,))
        if unread or d.get(section, {}).get(key, before) == before:
            d.get(section, {}).pop(key, None)
    d.pop("demo", None)  # (older configs carried the demo section; the demo's data is fingerprinted by its files)
    return d
