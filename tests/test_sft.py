"""Stage 2 (SFT): the loss mask, data formats and bad records, overlong policy, a micro run that
learns, exact resume, accumulation invariance, and `chatforge sample --chat` on the result."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from chatforge import cli
from chatforge.config import ConfigError, load_config
from chatforge.data.conversations import Conversation
from chatforge.data.records import DataError, fingerprint
from chatforge.data.sft import build_sft_data, collate, tokenize_conversations
from chatforge.demo.files import write_world
from chatforge.engine import Engine
from chatforge.metrics import read_metrics
from chatforge.model.load import load_causal_lm
from chatforge.stages import pretrain, sft
from chatforge.tokenizer import render_conversation, render_prompt, train_tokenizer
from chatforge.trainer import Interrupted, Trainer
from tests.conftest import ROOT

MICRO = ROOT / "configs" / "micro.yaml"


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    return write_world(tmp_path_factory.mktemp("world"), seed=0, corpus_mb=0.25, n_sft=400, n_pairs=0,
                       n_rl_prompts=0, n_eval_prompts=0)


@pytest.fixture(scope="module")
def base(world, tmp_path_factory) -> Path:
    """A micro base model pretrained on the demo corpus (30 steps)."""
    out = tmp_path_factory.mktemp("base") / "base"
    pretrain.run(load_config("pretrain", MICRO, [f"data.path=[{world['corpus']}]", "train.eval_every=0",
                                                 "train.ckpt_every=0"]), out)
    return out


def sft_cfg(base: Path, data, *extra: str):
    paths = data if isinstance(data, list) else [data]
    return load_config("sft", MICRO, [f"model.init={base}", f"data.path=[{','.join(map(str, paths))}]",
                                      "sft.max_new_tokens=16", *extra])


@pytest.fixture(scope="module")
def sft_run(base, world, tmp_path_factory) -> Path:
    """80 SFT steps on the demo conversations, evaluated every 40."""
    out = tmp_path_factory.mktemp("sft") / "sft"
    sft.run(sft_cfg(base, world["sft"], "train.max_steps=80", "train.eval_every=40", "train.ckpt_every=0"), out)
    return out


@pytest.fixture(scope="module")
def byte_tok():
    return train_tokenizer([], 0)  # bytes only: one token per ASCII character


def rows(out: Path, kind: str, key: str) -> list:
    return [r[key] for r in read_metrics(out) if r.get("kind") == kind]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def data_cfg(path, *extra: str):
    return load_config("sft", None, [f"data.path=[{path}]", "data.val_fraction=0", *extra])


# ----------------------------------------------------------------------------- data


def test_loss_mask_covers_exactly_the_assistant_tokens(byte_tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4."}]
    f = write_jsonl(tmp_path / "multi.jsonl", [{"messages": msgs}, {"prompt": "x", "completion": "y"}])
    data = build_sft_data(data_cfg(f), byte_tok, block_size=64)
    ex = data.train[0]
    assert ex.source == f"{f}:1" and len(data.train) == 2
    # independent reading of the mask: after each <|assistant|>, everything up to and including <|end|>
    want, inside = [], False
    for t in ex.ids:
        want.append(1 if inside else 0)
        if t == byte_tok.assistant_id:
            inside = True
        elif t == byte_tok.end_id:
            inside = False
    assert ex.mask == want
    assert byte_tok.decode([t for t, m in zip(ex.ids, ex.mask) if m]) == "Hello.<|end|>4.<|end|>"
    assert sum(ex.mask) == len("Hello.") + 1 + len("4.") + 1
    # batches: inputs ids[:-1], targets ids[1:], mask shifted with the targets, right padding
    x, y, m = collate(data.train, byte_tok.pad_id)  # (2, T)
    n = len(ex.ids) - 1
    assert x.shape == (2, n) and x[0].tolist() == ex.ids[:-1] and y[0].tolist() == ex.ids[1:]
    assert m[0].tolist() == ex.mask[1:]
    short = data.train[1]
    k = len(short.ids) - 1
    assert (x[1, k:] == byte_tok.pad_id).all() and (m[1, k:] == 0).all() and m[1, :k].tolist() == short.mask[1:]
    assert byte_tok.decode(y[1][m[1].bool()].tolist()) == "y<|end|>"


@pytest.mark.parametrize("name,records", [("alpaca_en_demo.json", 999), ("identity.json", 91),
                                          ("self_instruct_seed_tasks.jsonl", 175)])
def test_shared_sft_files_parse_and_tokenise(shared_data, byte_tok, name, records):
    path = shared_data / "sft" / name
    data = build_sft_data(data_cfg(path, "data.val_fraction=0.1"), byte_tok, block_size=256)
    meta = data.meta
    n_conv = meta["train"]["conversations"] + meta["val"]["conversations"]
    assert n_conv >= records  # self-instruct tasks may hold several instances
    assert meta["val"]["conversations"] == round(n_conv * 0.1)
    kept = meta["train"]["examples"] + meta["val"]["examples"]
    assert kept + meta["train"]["dropped_no_response"] + meta["val"]["dropped_no_response"] == n_conv
    assert meta["fingerprint"] == fingerprint([path])
    for ex in data.train[:50]:
        assert len(ex.ids) <= 257 and sum(ex.mask[1:]) > 0 and ex.ids[0] == byte_tok.bos_id
        assert ex.source.startswith(str(path) + ":")


BAD = [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}, "empty assistant response"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "yo"}]}, "starts with the assistant"),
]


@pytest.mark.parametrize("bad,problem", BAD, ids=[p for _, p in BAD])
def test_bad_record_names_file_and_line(byte_tok, tmp_path, bad, problem):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    f = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as e:
        build_sft_data(data_cfg(f), byte_tok, block_size=64)
    assert str(e.value).startswith(f"{f}:3: ") and problem in str(e.value)
    if problem != "invalid JSON":  # non-strict: a counted skip, never a silent drop
        data = build_sft_data(data_cfg(f, "data.strict=false"), byte_tok, block_size=64)
        assert len(data.train) == 3 and sum(data.meta["skipped_records"]["train"].values()) == 1


def test_renderer_rejection_is_a_located_data_error(byte_tok):
    conv = Conversation([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "d/x.jsonl:7#1")
    with pytest.raises(DataError, match=r"^d/x.jsonl:7: cannot render conversation: message 1: empty"):
        tokenize_conversations([conv], byte_tok, 64)
    _, stats = tokenize_conversations([conv], byte_tok, 64, strict=False)
    assert stats.skipped == 1 and stats.examples == 0


def test_overlong_truncate_and_drop_are_counted(byte_tok):
    def conv(u, a, i):
        return Conversation([{"role": "user", "content": u}, {"role": "assistant", "content": a}], f"f:{i}")

    convs = [conv("hi", "ok", 1),            # 1 + 4 + 4 = 9 ids: fits
             conv("hi", "x" * 40, 2),        # 1 + 4 + 42 = 47: truncated, keeps response tokens
             conv("q" * 40, "ok", 3)]        # the prefix of 33 ids is all prompt: dropped
    max_len = 33  # block_size 32
    ex, st = tokenize_conversations(convs, byte_tok, max_len, "truncate")
    assert (st.examples, st.truncated, st.dropped_no_response, st.dropped_overlong) == (2, 1, 1, 0)
    full = render_conversation(byte_tok, convs[1].messages)
    assert ex[1].ids == full[0][:33] and ex[1].mask == full[1][:33] and sum(ex[1].mask) == 33 - 6  # BOS <|user|> h i <|end|> <|assistant|>
    ex, st = tokenize_conversations(convs, byte_tok, max_len, "drop")
    assert (st.examples, st.truncated, st.dropped_overlong, st.dropped_no_response) == (1, 0, 2, 0)
    assert [e.source for e in ex] == ["f:1"]


# ----------------------------------------------------------------------------- the stage


def test_micro_sft_lowers_heldout_response_loss(sft_run, world, base):
    val = rows(sft_run, "eval", "val_loss")
    assert len(val) == 3  # steps 0, 40, 80
    assert val[-1] < val[0] - 1.5, val  # measured: 5.38 -> 3.31 nats per response token
    train = [r for r in read_metrics(sft_run) if r["kind"] == "train"]
    assert len(train) == 80 and all(0 < r["response_tokens"] < r["tokens"] for r in train)
    assert all(0 <= r["pad_frac"] < 0.3 for r in train)
    samples = [r for r in read_metrics(sft_run) if r["kind"] == "samples"]
    assert [r["step"] for r in samples] == [0, 40, 80]
    assert all(len(r["samples"]) == 4 for r in samples)
    assert samples[0]["samples"][0]["prompt"] == samples[-1]["samples"][0]["prompt"]
    assert {"greedy", "sampled", "greedy_finished", "sampled_finished"} <= set(samples[-1]["samples"][0])
    info = json.loads((sft_run / "chatforge.json").read_text())
    assert info["stage"] == "sft" and info["data"]["fingerprint"] == fingerprint([world["sft"]])
    assert info["data"]["train"]["examples"] + info["data"]["val"]["examples"] == 400
    assert {"truncated", "dropped_overlong", "dropped_no_response"} <= set(info["data"]["train"])
    assert info["metrics"]["eval_val_loss"] == pytest.approx(val[-1])
    assert info["config"]["model"]["init"] == str(base)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (sft_run / name).is_file(), name


def test_sft_needs_a_starting_model(world, tmp_path):
    cfg = load_config("sft", MICRO, [f"data.path=[{world['sft']}]"])
    with pytest.raises(ConfigError, match="model.init"):
        sft.run(cfg, tmp_path / "sft")


def test_bad_file_through_the_cli_is_one_line_error(base, tmp_path, capsys):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                           {"role": "assistant", "content": "b"}]},
                                             {"messages": [{"role": "assistant", "content": "b"}]}])
    with pytest.raises(SystemExit) as e:
        cli.main(["sft", "--config", str(MICRO), "--out", str(tmp_path / "sft"), f"--model.init={base}",
                  f"--data.path={f}"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}:2: ") and "starts with the assistant" in err and "Traceback" not in err


def quick(base, world, *extra):
    return sft_cfg(base, world["sft"], "train.eval_batches=1", "sft.max_new_tokens=4", "sft.n_eval_prompts=2",
                   *extra)


def test_exact_resume_after_interrupt(base, world, tmp_path, monkeypatch):
    common = ["train.max_steps=6", "train.eval_every=3", "train.ckpt_every=0"]
    full = tmp_path / "full"
    sft.run(quick(base, world, *common), full)
    out = tmp_path / "resumed"
    real_fit = Trainer.fit

    def fit_interrupted_in_step_4(self, step_fn, eval_fn=None, **kw):
        def step(s):
            if s == 3:  # inside the 4th step
                os.kill(os.getpid(), signal.SIGINT)
            return step_fn(s)
        return real_fit(self, step, eval_fn, **kw)

    monkeypatch.setattr(Trainer, "fit", fit_interrupted_in_step_4)
    with pytest.raises(Interrupted):
        sft.run(quick(base, world, *common), out)
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 4
    assert not (out / "model.safetensors").exists()
    monkeypatch.setattr(Trainer, "fit", real_fit)
    sft.run(quick(base, world, *common), out)
    for kind, key in (("train", "loss"), ("train", "grad_norm"), ("train", "tokens"), ("eval", "val_loss"),
                      ("samples", "samples")):
        assert rows(out, kind, key) == rows(full, kind, key), (kind, key)
    assert rows(out, "train", "step") == list(range(1, 7))


def test_batch8_equals_batch4_accum2(base, world, tmp_path):
    """One step: batch 8 x accumulation 1 and batch 4 x accumulation 2 see the same 8 conversations
    and give the same loss and gradient (normalised by the step's response-token count)."""
    common = ["train.max_steps=1", "train.eval_every=0", "train.ckpt_every=0", "sft.n_eval_prompts=0",
              "train.eval_batches=1"]
    a, b = tmp_path / "a", tmp_path / "b"
    sft.run(quick(base, world, *common, "train.batch_size=8", "train.grad_accum=1"), a)
    sft.run(quick(base, world, *common, "train.batch_size=4", "train.grad_accum=2"), b)
    ra, rb = rows(a, "train", "loss"), rows(b, "train", "loss")
    assert ra == pytest.approx(rb, rel=1e-5, abs=1e-6)
    assert rows(a, "train", "grad_norm") == pytest.approx(rows(b, "train", "grad_norm"), rel=1e-4)
    assert rows(a, "train", "response_tokens") == rows(b, "train", "response_tokens")


def test_cli_sample_chat_answers_and_stops_at_end(sft_run, world, capsys):
    model, _, tok = load_causal_lm(sft_run)
    prompts = [json.loads(line)["messages"][0]["content"] for line in open(world["sft"])][:8]
    res = Engine(model).generate([render_prompt(tok, [{"role": "user", "content": p}]) for p in prompts], 40,
                                 temperature=0.0, stop_ids=[tok.end_id], pad_id=tok.pad_id)
    assert sum(res.finished) >= 4, res.finished  # the SFT model learnt to end its turn
    answers = [tok.decode(t[:-1]) if f else None for t, f in zip(res.tokens, res.finished)]
    i = next(k for k, a in enumerate(answers) if a and a.strip())  # a finished, non-empty answer
    want = answers[i]
    assert res.tokens[i][-1] == tok.end_id and tok.end_id not in res.tokens[i][:-1]
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--model", str(sft_run), "--chat", prompts[i], "--temperature", "0",
                  "--max-new-tokens", "40"])
    assert e.value.code == 0
    assert capsys.readouterr().out == want + "\n"  # the answer alone, cut at <|end|>
