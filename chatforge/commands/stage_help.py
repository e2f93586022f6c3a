"""The help of ``chatforge STAGE --help``: the config sections a stage reads and the fields most runs set,
each with its default and the docstring written under it in chatforge/config.py."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from functools import lru_cache

STAGE_SECTIONS = {
    "pretrain": ("model", "tokenizer", "data", "optim", "train", "dist"),
    "sft": ("model", "data", "optim", "train", "dist", "sft", "lora"),
    "rm": ("model", "data", "optim", "train", "dist", "rm", "lora"),
    "dpo": ("model", "data", "optim", "train", "dist", "dpo", "lora"),
    "ppo": ("model", "data", "optim", "train", "dist", "rl", "lora"),
    "grpo": ("model", "data", "optim", "train", "dist", "rl", "lora"),
}
"""The config sections each stage reads (the others are ignored by it)."""

_FINETUNE = ("model.init", "data.path", "data.strict", "train.max_steps", "train.batch_size", "train.grad_accum",
             "optim.lr", "train.device", "lora.r")
KEY_FIELDS = {
    "pretrain": ("data.path", "tokenizer.vocab_size", "tokenizer.path", "model.n_layer", "model.n_embd",
                 "model.block_size", "train.max_steps", "train.batch_size", "train.grad_accum", "optim.lr",
                 "train.device"),
    "sft": _FINETUNE,
    "rm": _FINETUNE,
    "dpo": _FINETUNE + ("dpo.beta",),
    "ppo": _FINETUNE + ("rl.reward_model", "rl.reward_fn", "rl.prompts_per_step", "rl.kl_coef"),
    "grpo": _FINETUNE + ("rl.algo", "rl.reward_model", "rl.reward_fn", "rl.prompts_per_step", "rl.group_size"),
}
"""The fields a user of each stage most often sets."""


@lru_cache(maxsize=1)
def field_docs() -> dict[str, tuple[object, str]]:
    """``{"train.max_steps": (default, docstring)}`` for every field of the config dataclasses."""
    from chatforge import config

    tree = ast.parse(inspect.getsource(config))
    docs: dict[str, dict[str, str]] = {}  # class name -> field -> docstring
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            fields = docs.setdefault(node.name, {})
            for stmt, nxt in zip(node.body, node.body[1:]):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                        and isinstance(nxt.value.value, str)):
                    fields[stmt.target.id] = " ".join(nxt.value.value.split())
    out = {}
    for section in dataclasses.fields(config.Config):
        if not isinstance(section.default_factory, type):  # the "stage" string
            continue
        cls = section.default_factory
        defaults = cls()
        for f in dataclasses.fields(cls):
            out[f"{section.name}.{f.name}"] = (getattr(defaults, f.name), docs.get(cls.__name__, {}).get(f.name, ""))
    return out


def epilog(stage: str, width: int = 100) -> str:
    """The text under the usage of ``chatforge STAGE --help``."""
    docs = field_docs()
    lines = [f"config sections read by {stage}: {', '.join(STAGE_SECTIONS[stage])}",
             "", "fields most runs set (--section.key=value on the command line, default in brackets):"]
    for key in KEY_FIELDS[stage]:
        default, doc = docs[key]
        text = f"{doc} [{default!r}]" if doc else f"[{default!r}]"
        head = f"  --{key}"
        body = textwrap.wrap(text, width - 28) or [""]
        lines.append(f"{head:<27} {body[0]}" if len(head) < 27 else head)
        lines += [f"{'':27} {b}" for b in (body[1:] if len(head) < 27 else body)]
    lines += ["",
              f"Values come from the defaults, then the preset (--config configs/*.yaml: its shared sections, then",
              f"its stages.{stage} section), then the command line. Every field, with its resolved value:",
              f"  chatforge {stage} --config PRESET.yaml [--section.key=value ...] --print-config",
              "Relative paths (--data.path, --model.init, also those inside a preset) are read from the",
              "current directory, not from the preset's folder."]
    return "\n".join(lines)
