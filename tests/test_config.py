"""Config presets, dotted overrides and their error messages."""

import pytest

from chatforge.config import ConfigError, load_config, parse_overrides
from tests.conftest import ROOT


def test_preset_then_stage_section_then_cli(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 1.0e-3\ntrain:\n  max_steps: 50\nstages:\n  sft:\n    optim:\n      lr: 1.0e-4\n")
    pre = load_config("pretrain", preset)
    assert pre.optim.lr == 1e-3 and pre.train.max_steps == 50 and pre.stage == "pretrain"
    sft = load_config("sft", preset)
    assert sft.optim.lr == 1e-4 and sft.train.max_steps == 50
    cli = load_config("sft", preset, parse_overrides(["--optim.lr=3e-4", "--train.max_steps", "7"]))
    assert cli.optim.lr == 3e-4 and cli.train.max_steps == 7


def test_list_and_optional_overrides():
    cfg = load_config("pretrain", None, parse_overrides(["--data.path=a.txt,b.txt", "--model.init=some/dir",
                                                         "--rl.kl_target=null", "--train.compile"]))
    assert cfg.data.path == ["a.txt", "b.txt"]
    assert cfg.model.init == "some/dir" and cfg.rl.kl_target is None and cfg.train.compile is True


def test_unknown_key_names_it_and_suggests_the_nearest():
    def error(key: str) -> str:
        with pytest.raises(ConfigError) as e:
            load_config("pretrain", None, [f"{key}=3"])
        msg = str(e.value)
        shown = key.split(".")[0] if key.startswith(("trian.", "zzz.")) else key  # an unknown section is named alone
        assert "\n" not in msg and f"unknown config key '{shown}'" in msg
        assert msg.startswith("command line: ")
        return msg

    msg = error("optim.lrr")
    assert msg.endswith("did you mean 'optim.lr'?") and "optim.weight_decay" not in msg  # no list of every key
    assert error("train.max_step").endswith("did you mean 'train.max_steps'?")
    assert error("max_steps").endswith("did you mean 'train.max_steps'?")  # the section left out
    assert error("trian.max_steps").endswith("did you mean 'train'?")  # a mistyped section
    assert "'data.path'" in error("data.pth")
    msg = error("zzz.qqq")
    assert "did you mean" not in msg and "--print-config" in msg and "--help" in msg


def test_unknown_section_in_file(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match=r"p.yaml.*optimizer"):
        load_config("pretrain", preset)
    preset.write_text("stages:\n  pretrian: {}\n")
    with pytest.raises(ConfigError, match="pretrian.*Valid stages"):
        load_config("pretrain", preset)


def test_wrong_type_and_bad_choice():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config("pretrain", None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="train.dtype.*auto, bf16, fp32"):
        load_config("pretrain", None, ["train.dtype=fp8"])
    with pytest.raises(ConfigError, match="n_embd"):
        load_config("pretrain", None, ["model.n_embd=100", "model.n_head=3"])


def test_missing_file_and_bad_argument():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("pretrain", "nope.yaml")
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_overrides(["lr=3"])


@pytest.mark.parametrize("name", ["tiny", "micro", "shakespeare_char"])
def test_shipped_presets_load_for_every_stage(name):
    path = ROOT / "configs" / f"{name}.yaml"
    if not path.exists():
        pytest.skip(f"{path} not present")
    for stage in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo"):
        load_config(stage, path)
