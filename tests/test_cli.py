"""The command line a user meets: help, --print-config, preset paths, exit codes and tracebacks, chat's slash
commands and Ctrl-C, notes when an answer or an input hit the context length, messages in users' words."""

from __future__ import annotations

import builtins
import io
import os
import subprocess
import sys

import pytest
import yaml

from chatforge import cli
from chatforge.commands import chat
from chatforge.engine import Engine
from tests.conftest import ROOT
from tests.test_chat import args_for, model_dir  # noqa: F401  (model_dir: a fixture; block_size 64)

pytestmark = pytest.mark.timeout(180)


def run_main(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


# ----------------------------------------------------------------------------- help and config


def test_bare_chatforge_prints_the_help(capsys):
    code, out, err = run_main([], capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: chatforge")
    for command in ("pretrain", "sft", "rm", "ppo", "dpo", "grpo", "sample", "chat", "score", "pipeline"):
        assert f"    {command}" in out, command


def test_stage_help_lists_sections_main_fields_and_print_config(capsys):
    code, out, _ = run_main(["sft", "--help"], capsys)
    assert code == 0
    assert "config sections read by sft: model, data, optim, train, dist, sft, lora" in out
    for flag in ("--model.init", "--data.path", "--train.max_steps", "--train.batch_size", "--optim.lr", "--lora.r"):
        assert f"\n  {flag} " in out, flag
    assert "Micro-batch size per process (sequences, pairs or prompts). [16]" in out  # docstring and default
    assert "--print-config" in out and "current directory" in out
    _, out, _ = run_main(["ppo", "--help"], capsys)
    assert "\n  --rl.reward_model " in out and "\n  --rl.kl_coef " in out
    _, out, _ = run_main(["pretrain", "--help"], capsys)
    assert "\n  --tokenizer.vocab_size " in out and "\n  --model.init " not in out  # pretraining starts from scratch


def test_print_config_prints_the_resolved_yaml_and_exits(tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text("optim:\n  lr: 0.01\nstages:\n  sft:\n    train:\n      max_steps: 7\n")
    code, out, err = run_main(["sft", "--config", str(preset), "--print-config", "--train.batch_size=3",
                               "--data.path=a.jsonl,b.jsonl"], capsys)
    assert code == 0, err
    cfg = yaml.safe_load(out)
    assert cfg["stage"] == "sft" and cfg["optim"]["lr"] == 0.01 and cfg["train"]["max_steps"] == 7
    assert cfg["train"]["batch_size"] == 3 and cfg["data"]["path"] == ["a.jsonl", "b.jsonl"]
    assert set(cfg) >= {"model", "tokenizer", "data", "optim", "train", "dist", "sft", "rm", "rl", "dpo", "lora"}
    code, _, err = run_main(["sft", "--train.max_steps=3"], capsys)  # neither --out nor --print-config
    assert code == 2 and "--out" in err


def test_a_missing_data_file_set_by_a_preset_says_where_to_get_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a clone of the repository alone: no ../shared/data beside it
    preset = ROOT / "configs" / "shakespeare_char.yaml"
    code, out, err = run_main(["pretrain", "--config", str(preset), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {preset} sets data.path to '../shared/data/tinyshakespeare.txt', which does not exist")
    assert f"relative paths are read from the current directory: {tmp_path.parent / 'shared/data/tinyshakespeare.txt'}" in err
    assert "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt" in err
    assert "--data.path=" in err
    assert not (tmp_path / "o").exists()  # nothing written
    header = preset.read_text().split("\nmodel:")[0]
    assert "--data.path" in header and "current directory" in header and "raw.githubusercontent.com" in header
    # a path given on the command line is the data readers' business (their error names it)
    code, _, err = run_main(["pretrain", "--config", str(preset), "--out", str(tmp_path / "o"),
                             "--data.path=nope.txt", "--train.max_steps=1"], capsys)
    assert code == 2 and err.startswith("error: nope.txt: no such file or folder")


# ----------------------------------------------------------------------------- errors, exit codes, tracebacks


@pytest.fixture
def failing_report(monkeypatch):
    """`chatforge report X` raising whatever the test sets."""
    import chatforge.commands.report as report

    box = {}

    def main(args, rest):
        raise box["exc"]

    monkeypatch.setattr(report, "main", main)
    return box


def test_user_errors_are_one_line_bugs_keep_their_traceback(failing_report, capsys, monkeypatch):
    from chatforge.config import ConfigError
    from chatforge.data.records import DataError
    from chatforge.errors import ChatforgeError
    from chatforge.trainer import Interrupted

    monkeypatch.delenv("CHATFORGE_DEBUG", raising=False)
    for exc, code, line in ((DataError("f.jsonl", 3, "bad"), 2, "error: f.jsonl:3: bad"),
                            (ConfigError("bad key"), 2, "error: bad key"),
                            (FileNotFoundError("no such file: x"), 2, "error: no such file: x"),
                            (Interrupted("interrupted at step 4"), 130, "chatforge: interrupted at step 4"),
                            (KeyboardInterrupt(), 130, "chatforge: interrupted")):
        assert isinstance(exc, (ChatforgeError, OSError, KeyboardInterrupt))
        failing_report["exc"] = exc
        got, _, err = run_main(["report", "x"], capsys)
        assert (got, err) == (code, line + "\n"), exc
    for bug in (ValueError("a programming error"), KeyError("k"), RuntimeError("boom")):
        failing_report["exc"] = bug
        with pytest.raises(type(bug)):  # not turned into "error: ..." and exit 2: Python prints the traceback
            cli.main(["report", "x"])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback_of_user_errors(failing_report, capsys, monkeypatch, how):
    from chatforge.data.records import DataError

    failing_report["exc"] = DataError("f.jsonl", 3, "bad")
    argv = ["report", "x"]
    if how == "flag":
        argv.append("--debug")
    else:
        monkeypatch.setenv("CHATFORGE_DEBUG", "1")
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "Traceback (most recent call last)" in err and "DataError: f.jsonl:3: bad" in err
    assert err.endswith("error: f.jsonl:3: bad\n")


def test_a_bug_prints_a_traceback_from_the_real_command_line(tmp_path):
    """End to end, in a real process: a user error (a corpus that does not exist) is one line and exit 2; a
    programming error (a ValueError from inside a command) prints Python's traceback and exit 1."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "chatforge", "tokenizer", "--data", str(tmp_path / "none.txt"),
                        "--out", str(tmp_path / "tok")], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
    code = ("import sys; import chatforge.commands.report as r\n"
            "def main(a, rest): raise ValueError('a programming error')\n"
            "r.main = main\nfrom chatforge.cli import main as cli\ncli(['report', 'x'])\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "ValueError: a programming error" in r.stderr


# ----------------------------------------------------------------------------- chat


def interactive(monkeypatch, lines):
    """A terminal session: input() returns the given lines in turn (an exception instance is raised)."""
    feed = iter(lines)

    def fake_input(prompt=""):
        print(prompt, end="")
        item = next(feed, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(sys, "stdin", io.StringIO())
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(builtins, "input", fake_input)


def spy_stream(monkeypatch, interrupt_on_call=None, after=2):
    """Record each generation's prompt; on call number ``interrupt_on_call`` raise KeyboardInterrupt (Ctrl-C)
    after ``after`` tokens."""
    calls = []
    real = Engine.stream

    def stream(self, prompt_ids, max_new_tokens, **kw):
        calls.append(list(prompt_ids))
        for i, t in enumerate(real(self, prompt_ids, max_new_tokens, **kw)):
            if len(calls) == interrupt_on_call and i == after:
                raise KeyboardInterrupt
            yield t

    monkeypatch.setattr(Engine, "stream", stream)
    return calls


def test_chat_slash_commands(model_dir, monkeypatch, capsys):
    interactive(monkeypatch, ["/help", "/hepl", "/model gpt-4", "hello", "//etc is a path", "/quit", "never read"])
    calls = spy_stream(monkeypatch)
    assert chat.main(args_for(model_dir, max_new_tokens=3, temperature=0), []) == 0
    out = capsys.readouterr().out
    for command in ("/help", "/reset", "/quit"):
        assert f"  {command} " in out
    assert "(unknown command /hepl; /help lists the commands; nothing was sent to the model)" in out
    assert "(unknown command /model; /help" in out  # a command with words after it is a command too
    assert len(calls) == 2  # "hello" and "/etc is a path"; no command reached the model
    from chatforge.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(model_dir)
    assert tok.decode(calls[1]).endswith("<|user|>/etc is a path<|end|><|assistant|>")


def test_chat_ctrl_c_stops_the_answer_then_quits(model_dir, monkeypatch, capsys):
    interactive(monkeypatch, ["first", "second", KeyboardInterrupt(), "never read"])
    calls = spy_stream(monkeypatch, interrupt_on_call=1, after=2)
    assert chat.main(args_for(model_dir, max_new_tokens=6, temperature=0), []) == 0  # no traceback, clean exit
    out = capsys.readouterr().out
    assert "(answer stopped; Ctrl-C again or Ctrl-D to quit)" in out
    assert len(calls) == 2  # the chat went on after the stopped answer
    from chatforge.tokenizer import ChatTokenizer

    second = ChatTokenizer.load(model_dir).decode(calls[1])
    assert "<|user|>first<|end|><|assistant|>" in second  # the stopped answer's shown part stays in the history
    assert out.count("you> ") == 3  # then Ctrl-C at the prompt left


def test_chat_ctrl_d_leaves(model_dir, monkeypatch, capsys):
    interactive(monkeypatch, [EOFError()])
    assert chat.main(args_for(model_dir), []) == 0


# ----------------------------------------------------------------------------- context-length notes


def test_stop_note():
    assert chat.stop_note(10, [5, 6, 2], stop_ids=[2], max_new_tokens=3, block_size=13) is None  # ended
    assert "context length (13 tokens, 10 of them the input)" in chat.stop_note(10, [5, 6, 7], [2], 8, 13)
    assert chat.stop_note(4, [5, 6, 7], [2], 3, 64) == "the answer stopped at --max-new-tokens (3)"
    assert chat.stop_note(4, [5, 6], [2], 3, 64) is None


def test_sample_says_when_the_input_was_cut_or_the_answer_hit_the_context(model_dir, capsys):
    long = "hello " * 200  # far more than the 64-token context
    code, out, err = run_main(["sample", "--model", str(model_dir), "--prompt", long, "--max-new-tokens", "5"],
                              capsys)
    assert code == 0, err
    assert "note: the input is" in err and "longer than the model's context of 64; only its last 63 tokens are used" in err
    assert "note: the answer stopped at the model's context length (64 tokens, 63 of them the input)" in err
    code, out, err = run_main(["sample", "--model", str(model_dir), "--prompt", "hello", "--max-new-tokens", "3"],
                              capsys)
    assert code == 0 and "note: the answer stopped at --max-new-tokens (3)" in err and "input is" not in err


def test_chat_says_when_a_message_was_cut(model_dir, monkeypatch, capsys):
    interactive(monkeypatch, ["word " * 200])
    spy_stream(monkeypatch)
    assert chat.main(args_for(model_dir, max_new_tokens=2), []) == 0
    out = capsys.readouterr().out
    assert "more than the model's context of 64; only its last 63 tokens are read)" in out


# ----------------------------------------------------------------------------- messages in users' words


def test_model_kind_errors_say_reward_model_and_language_model(model_dir, tmp_path):
    from chatforge.config import ModelConfig
    from chatforge.model.hf import ModelDirError
    from chatforge.model.heads import ScalarModel
    from chatforge.model.load import load_causal_lm, load_scalar_model
    from chatforge.model.save import save_model_dir
    from chatforge.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(model_dir)
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64)
    save_model_dir(ScalarModel(cfg, tok.vocab_size), tmp_path / "rm", cfg, tok)
    with pytest.raises(ModelDirError) as e:
        load_causal_lm(tmp_path / "rm")
    assert "holds a reward model, not a language model" in str(e.value) and "ScalarModel" not in str(e.value)
    with pytest.raises(ModelDirError) as e:
        load_scalar_model(model_dir)
    assert "holds a language model, not a reward model" in str(e.value) and "GPT" not in str(e.value)
