"""Experiment trackers: a micro GRPO run with TensorBoard and W&B on holds in its event files exactly the scalars
of its metrics.jsonl (read back with TensorBoard's own reader) and its sample tables; W&B writes an offline run
folder without network; `chatforge export --to tensorboard` of a finished run gives the same scalars; a tracker
whose package is missing is a one-line error naming the package."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from chatforge import cli
from chatforge.config import ConfigError, load_config
from chatforge.metrics import MetricsLog, read_metrics
from chatforge.tracking import TENSORBOARD_DIR, check_trackers, flat_config, scalars
from tests.rl_fixtures import MICRO, rl_overrides, single_thread, world  # noqa: F401 (fixtures)

pytest.importorskip("tensorboard")

NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def expected_scalars(rows: list[dict]) -> dict[tuple[str, int], float]:
    """What the trackers must show, computed from metrics.jsonl alone: every number of a row but its step,
    as '<kind>/<key>' at the row's step."""
    want = {}
    for r in rows:
        for k, v in r.items():
            if k in ("kind", "step") or isinstance(v, bool):
                continue
            if isinstance(v, str):
                v = NON_FINITE.get(v)
            if isinstance(v, (int, float)):
                want[(f"{r['kind']}/{k}", r["step"])] = float(v)
    return want


def read_events(log_dir: Path) -> tuple[dict[tuple[str, int], float], dict, list[str]]:
    """(scalars {(tag, step): value}, text summaries {tag: [steps]}, hparam names) with TensorBoard's reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    got = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            assert (tag, e.step) not in got, f"{tag} logged twice at step {e.step}"
            got[(tag, e.step)] = e.value
    texts = {tag.split("/")[0]: [e.step for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}  # add_text's
    # tags read "<tag>/text_summary"
    hp = []
    for tag, content in acc.PluginTagToContent("hparams").items():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.HasField("session_start_info"):
            hp = list(data.session_start_info.hparams.keys())
    return got, texts, hp


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, v in want.items():
        g = got[key]
        assert (math.isnan(g) and math.isnan(v)) or g == pytest.approx(v, rel=1e-6, abs=1e-30), key


@pytest.fixture(scope="module")
def tracked_run(world, tmp_path_factory) -> Path:  # noqa: F811
    """A 6-step GRPO run with --train.trackers=tensorboard,wandb (W&B left unconfigured: offline)."""
    pytest.importorskip("wandb")
    from chatforge.stages import grpo

    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("home")
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR"):
        mp.delenv(var, raising=False)
    mp.setenv("HOME", str(home))  # no ~/.netrc: W&B is not logged in
    mp.setenv("WANDB_SILENT", "true")
    out = tmp_path_factory.mktemp("tracked") / "grpo"
    try:
        cfg = load_config("grpo", MICRO, rl_overrides(world, 6, "rl.algo=grpo", "rl.group_size=2",
                                                      "rl.sample_every=3", "train.trackers=[tensorboard,wandb]"))
        grpo.run(cfg, out)
    finally:
        mp.undo()
    return out


def test_tensorboard_events_hold_the_metrics_rows(tracked_run):
    rows = read_metrics(tracked_run)
    assert {r["kind"] for r in rows} >= {"train", "samples"}
    got, texts, hparams = read_events(tracked_run / TENSORBOARD_DIR)
    want = expected_scalars(rows)
    assert any(k[0] == "train/reward" for k in want) and any(k[0] == "train/loss" for k in want)
    assert_same(got, want)
    # the sample tables (prompt, response, reward) at the steps of the samples rows
    assert texts["samples"] == [r["step"] for r in rows if r["kind"] == "samples"]
    # the resolved config is the run's hyper-parameters
    cfg = json.loads((tracked_run / "chatforge.json").read_text())["config"]
    assert set(hparams) == set(flat_config(cfg)) and "rl.group_size" in hparams


def test_wandb_offline_run_folder(tracked_run):
    runs = list((tracked_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tracked_run / "wandb").iterdir())
    run_id = (tracked_run / "wandb" / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(run_id)
    data = list(runs[0].glob("*.wandb"))
    assert data and data[0].stat().st_size > 0
    # the offline run's records hold the run's metrics and the samples table
    raw = data[0].read_bytes()
    assert b"train/reward" in raw and b"samples" in raw


def test_export_gives_the_same_scalars(tracked_run, tmp_path, capsys):
    """`chatforge export RUN_DIR --to tensorboard` on a pipeline-like run folder: each stage's events."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tracked_run, run / "grpo", ignore=shutil.ignore_patterns("tensorboard", "wandb", "checkpoint"))
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(run), "--to", "tensorboard"])
    assert e.value.code == 0
    assert "grpo" in capsys.readouterr().out
    got, texts, hparams = read_events(run / "grpo" / TENSORBOARD_DIR)
    assert_same(got, expected_scalars(read_metrics(run / "grpo")))
    live, live_texts, live_hp = read_events(tracked_run / TENSORBOARD_DIR)
    assert got == live and texts == live_texts and sorted(hparams) == sorted(live_hp)
    # exporting again replaces the events (no duplicated scalars)
    with pytest.raises(SystemExit):
        cli.main(["export", str(run / "grpo"), "--to", "tensorboard"])
    assert read_events(run / "grpo" / TENSORBOARD_DIR)[0] == got


def test_scalars_of_a_row():
    row = {"kind": "eval", "step": 7, "val_loss": 2.5, "n": 3, "flag": True, "note": "x", "bad": "nan"}
    s = scalars(row)
    assert s.keys() == {"eval/val_loss", "eval/n", "eval/bad"}
    assert s["eval/val_loss"] == 2.5 and s["eval/n"] == 3.0 and math.isnan(s["eval/bad"])


def test_missing_tracker_package_is_a_one_line_error(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = load_config("sft", MICRO, ["train.trackers=[tensorboard,wandb]"])
    with pytest.raises(ConfigError) as e:
        MetricsLog(tmp_path, True, cfg)
    msg = str(e.value)
    assert "\n" not in msg and "pip install 'chatforge[track]'" in msg and "wandb" in msg
    with pytest.raises(ConfigError, match="choose from tensorboard, wandb, trackio"):
        check_trackers(["mlflow"])
    assert MetricsLog(tmp_path, False, cfg).trackers is None  # other ranks never open trackers


def test_trackio_behind_the_same_interface(tmp_path, monkeypatch):
    if importlib.util.find_spec("trackio") is None:
        pytest.skip("trackio is not installed (pip install 'chatforge[track]' brings it); its tracker is untested")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    cfg = load_config("sft", MICRO, ["train.trackers=[trackio]"])
    log = MetricsLog(tmp_path / "sft", True, cfg)
    log.write({"kind": "train", "step": 1, "loss": 1.5})
    log.write({"kind": "samples", "step": 1, "samples": [{"prompt": "p", "response": "r", "reward_raw": 1.0}]})
    log.close()
    assert read_metrics(tmp_path / "sft")[0]["loss"] == 1.5


def test_trackers_do_not_change_a_pipeline_fingerprint():
    """Turning a tracker on for a finished pipeline run does not retrain its stages (export covers them)."""
    from chatforge.pipeline import config_fingerprint

    plain = load_config("sft", MICRO, [])
    tracked = load_config("sft", MICRO, ["train.trackers=[tensorboard]"])
    assert tracked.train.trackers == ["tensorboard"]
    assert config_fingerprint(plain) == config_fingerprint(tracked)
