"""``chatforge STAGE``: run one training stage (pretrain, sft, rm, ppo, dpo, grpo) into ``--out``.

    chatforge sft --config configs/tiny.yaml --out runs/sft --model.init=runs/base --data.path=sft.jsonl
    chatforge sft --config configs/tiny.yaml --print-config      (the resolved config as YAML, then exit)

Words after the known options are dotted config overrides (``--train.max_steps=100``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from pathlib import Path
from typing import Optional

PATH_FIELDS = ("data.path", "data.val_path")
"""Config fields naming input files, checked before a run when a preset set them."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="preset YAML (configs/*.yaml)")
    p.add_argument("--out", help="output model directory (resumed when it holds a checkpoint)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults + preset + overrides) as YAML and exit")


def config_yaml(cfg) -> str:
    """A resolved Config as YAML, every section and field."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def data_hints(preset: Path) -> list[str]:
    """The ``# data: ...`` lines of a preset's header comment (where to get its data files)."""
    hints = []
    for line in preset.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        m = re.match(r"#\s*data:\s*(.*)", line, re.IGNORECASE)
        if m:
            hints.append(m.group(1).strip())
    return hints


def check_preset_paths(cfg, preset: Optional[str], overrides: list[str]) -> None:
    """Stop with one line when a data path that the preset (not the command line) set does not exist: it
    names the preset and the path, says that relative paths are read from the current directory, where the
    preset says to get the file, and to pass ``--data.path``. Paths given on the command line are left to the
    data readers, whose errors name them."""
    from chatforge.config import ConfigError

    if preset is None:
        return
    given = {o.split("=", 1)[0] for o in overrides}
    for key in PATH_FIELDS:
        if key in given:
            continue
        section, name = key.split(".")
        for p in getattr(getattr(cfg, section), name) or []:
            if Path(p).exists():
                continue
            where = os.path.abspath(p)
            hints = data_hints(Path(preset))
            get = f" Get it: {' '.join(hints)}." if hints else ""
            raise ConfigError(f"{preset} sets {key} to '{p}', which does not exist (relative paths are read from "
                              f"the current directory: {where}).{get} Then pass --{key}=/path/to/the/file.")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    from chatforge.config import load_config, parse_overrides

    overrides = parse_overrides(rest)
    cfg = load_config(args.command, args.config, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    check_preset_paths(cfg, args.config, overrides)
    importlib.import_module(f"chatforge.stages.{args.command}").run(cfg, args.out)
    return 0
