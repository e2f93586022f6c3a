"""How command-line words and YAML layers become a merged OmegaConf config, and how a merge error is told to
the user: ``--a.b=c`` words to dotlist entries (:func:`parse_overrides`), comma lists into list fields
(:func:`coerce_lists`), and an unknown key or a bad value as one line naming the key and the nearest valid ones
(:func:`explain`). Used by chatforge.config (the stages' configs) and chatforge.recipe_config (the pipeline's)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from chatforge.errors import ConfigError


def _valid_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for k, v in node.items():
        if isinstance(v, DictConfig):
            keys += _valid_keys(v, f"{prefix}{k}.")
        else:
            keys.append(f"{prefix}{k}")
    return keys


def nearest_keys(key: str, schema: DictConfig) -> list[str]:
    """The valid dotted keys closest to a mistyped one (difflib), best first: by the whole key, else by its
    last part (``--max_steps`` -> ``train.max_steps``)."""
    import difflib

    keys = _valid_keys(schema) + [k for k, v in schema.items() if isinstance(v, DictConfig)]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=3, cutoff=0.75)]
    return close


def explain(e: OmegaConfBaseException, schema: DictConfig, source: str) -> ConfigError:
    full_key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    if isinstance(e, ConfigKeyError):
        close = nearest_keys(full_key, schema)
        hint = (f"did you mean {' or '.join(repr(k) for k in close)}?" if close else
                "the command's --help lists the main keys, --print-config every key.")
        return ConfigError(f"{source}: unknown config key '{full_key}'; {hint}")
    return ConfigError(f"{source}: bad value for '{full_key}': {msg}")


def parse_overrides(args: list[str]) -> list[str]:
    """Turn ``--a.b=c`` / ``--a.b c`` command-line words into OmegaConf dotlist entries."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) == 2:
            raise ConfigError(f"unexpected argument '{a}': overrides look like --section.key=value")
        key = a[2:]
        if "=" in key:
            out.append(key)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            out.append(f"{key}={args[i + 1]}")
            i += 1
        else:
            out.append(f"{key}=true")  # a bare flag sets a bool
        i += 1
    return out


def coerce_lists(schema: DictConfig, dotlist: list[str]) -> list[str]:
    """Let ``--data.path=a.txt,b.txt`` fill a list field without YAML brackets."""
    fixed = []
    for item in dotlist:
        key, _, value = item.partition("=")
        try:
            node = OmegaConf.select(schema, key, throw_on_missing=False)
        except Exception:
            node = None
        if isinstance(node, ListConfig) and not value.startswith("["):
            parts = [p for p in value.split(",") if p] if value else []
            value = "[" + ",".join(f"'{p}'" for p in parts) + "]"
        fixed.append(f"{key}={value}")
    return fixed


def read_yaml(path: str | Path) -> DictConfig:
    """A preset YAML as a mapping of sections (one-line errors for a missing file or another shape)."""
    if not Path(path).is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    raw = OmegaConf.load(path)
    if not isinstance(raw, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of sections")
    return raw


def merge_layers(schema: DictConfig, layers: list[tuple[str, Any]]) -> Any:
    """The dataclass object of ``schema`` with each (source, layer) merged on top in turn; a bad key or value
    is a ConfigError naming its source (the file, the stage section or the command line)."""
    merged = schema
    for source, layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise explain(e, schema, source) from None
    return OmegaConf.to_object(merged)
