"""Stage 3 (reward model): reward read at <|end|>, Bradley-Terry through the stage, data, HF round trip,
normalisation, `chatforge score`, exact resume, and reward sources (chatforge.rl.reward)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from chatforge.config import ConfigError, load_config
from chatforge.data.batching import BucketBatcher, pad
from chatforge.data.pairs import collate_pairs, collate_unique, load_pair_data
from chatforge.data.records import DataError
from chatforge.model.heads import gather_last
from chatforge.model.load import load_causal_lm, scalar_from_causal
from chatforge.stages import rm
from tests.conftest import ROOT, interrupted_then_resumed

MICRO = ROOT / "configs" / "micro.yaml"
BLOCK = 128  # demo pairs are up to ~115 tokens with the micro tokenizer


def build_micro_base(root: Path) -> Path:
    """A micro base model (pretrained briefly on generated demo text), built once per test session."""
    out = root / "micro_base"
    if (out / "model.safetensors").exists():
        return out
    from chatforge.demo.corpus import generate_corpus
    from chatforge.stages import pretrain

    corpus = root / "micro_corpus.txt"
    corpus.write_text("<|endoftext|>".join(generate_corpus(0, 200_000)))
    cfg = load_config("pretrain", MICRO, [f"data.path=[{corpus}]", f"model.block_size={BLOCK}",
                                          "train.max_steps=25", "train.eval_every=0", "train.ckpt_every=0"])
    pretrain.run(cfg, out)
    return out


def write_demo_pairs(path: Path, n: int, seed: int = 0, noise: float = 0.0) -> Path:
    from chatforge.demo.preferences import variant_pairs

    with open(path, "w") as f:
        for p in variant_pairs(seed, n, noise=noise):
            f.write(json.dumps({k: p[k] for k in ("prompt", "chosen", "rejected")}) + "\n")
    return path


@pytest.fixture(scope="session")
def micro_base(tmp_path_factory) -> Path:
    return build_micro_base(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_demo_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", 360)


def rm_cfg(base: Path, pairs: Path, *extra: str):
    return load_config("rm", MICRO, [f"model.init={base}", f"data.path=[{pairs}]", "data.val_fraction=0.2",
                                     "train.eval_batches=0", "optim.lr=2e-3", *extra])


@pytest.fixture(scope="module")
def trained_rm(micro_base, pairs_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm") / "rm"
    rm.run(rm_cfg(micro_base, pairs_file, "train.max_steps=50", "train.eval_every=25", "train.ckpt_every=0"), out)
    return out


def rows(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ---------------------------------------------------------------------------------------------- reading the reward


class LengthModel(torch.nn.Module):
    """A stand-in scalar model whose value at position t is t + 1 (so a row's reward is its length)."""

    def forward(self, idx, attention_mask=None):
        return torch.arange(1, idx.shape[1] + 1, dtype=torch.float32).expand(idx.shape).clone()  # (B, T)


def test_bradley_terry_and_accuracy_through_the_stage_on_hand_values(micro_base):
    """pair_rewards reads each row at its <|end|>; with reward = sequence length the loss is known by hand."""
    from chatforge.data.pairs import TokenPair

    pairs = [TokenPair([0, 3, 7, 4], [9, 5], [9, 9, 9, 5], "x:1"),  # lengths 6 vs 8
             TokenPair([0, 3, 4], [9, 9, 9, 5], [5], "x:2"),  # lengths 7 vs 4
             TokenPair([0, 3, 7, 4], [9, 9, 9, 5], [9, 5], "x:3")]  # x:1's answers, swapped: no new rows
    assert collate_pairs(pairs, pad_id=1).response_mask[0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]  # DPO's batches
    batch = collate_unique(pairs, pad_id=1)
    assert batch.ids.shape == (4, 8) and batch.ids[0, 6:].tolist() == [1, 1]  # right-padded with <|pad|>
    assert batch.chosen.tolist() == [0, 1, 2] and batch.rejected.tolist() == [2, 3, 0]  # each sequence once
    r_c, r_r = rm.pair_rewards(LengthModel(), batch)
    assert r_c.tolist() == [6.0, 7.0, 8.0] and r_r.tolist() == [8.0, 4.0, 6.0]
    r_c, r_r = r_c[:2], r_r[:2]
    from chatforge import losses

    m = 0.5
    got = losses.bradley_terry(r_c, r_r, m)
    want = [-math.log(1 / (1 + math.exp(-(d - m)))) for d in (-2.0, 3.0)]
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert losses.preference_accuracy(r_c, r_r).item() == 0.5


def test_reward_read_at_end_token_for_left_and_right_padding(micro_base):
    torch.manual_seed(0)
    policy, _, tok = load_causal_lm(micro_base)
    model = scalar_from_causal(policy).eval()
    from chatforge.tokenizer import render_prompt, render_response

    seqs = [render_prompt(tok, [{"role": "user", "content": q}]) + render_response(tok, a)
            for q, a in (("What is 2 plus 9?", "It is 11."), ("Hi", "Hello! How can I help you today, friend?"))]
    alone = torch.stack([model(torch.tensor([s]))[0, -1] for s in seqs])  # (2,) each row unpadded
    for side in ("right", "left"):
        ids = pad(seqs, tok.pad_id, side)  # (2, T)
        mask = pad([[1] * len(s) for s in seqs], 0, side)  # (2, T)
        got = gather_last(model(ids, mask), mask)
        torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-5)
        last = ids.gather(1, mask.cumsum(1).argmax(1, keepdim=True))  # token at the rightmost real slot
        assert last.flatten().tolist() == [tok.end_id, tok.end_id]
    # the stage's own batches (right padding, no attention mask) give the same rewards
    from chatforge.data.pairs import TokenPair

    p0 = render_prompt(tok, [{"role": "user", "content": "What is 2 plus 9?"}])
    batch = collate_unique([TokenPair(p0, seqs[0][len(p0):], render_response(tok, "No idea, sorry about that."), "x:1")],
                           tok.pad_id)
    r_c, _ = rm.pair_rewards(model, batch)
    torch.testing.assert_close(r_c, alone[:1], rtol=1e-5, atol=1e-5)


def test_calibration_table_by_hand():
    r_c = torch.tensor([2.0, 0.0, -1.0])
    r_r = torch.tensor([0.0, 0.0, 0.0])
    table, ece = rm.calibration_table(r_c, r_r, bins=2)
    p = [1 / (1 + math.exp(-2)), 0.5, 1 / (1 + math.exp(1))]  # P(chosen > rejected)
    # both orders: probs p (outcome 1) and 1 - p (outcome 0); bin [0, .5): 1-p0, p2 ; bin [.5, 1]: p0, p1, 1-p1, 1-p2
    low = [1 - p[0], p[2]]
    high = [p[0], p[1], 1 - p[1], 1 - p[2]]
    assert [r["n"] for r in table] == [2, 4]
    assert table[0]["predicted"] == pytest.approx(sum(low) / 2, abs=1e-4) and table[0]["observed"] == 0.5
    assert table[1]["predicted"] == pytest.approx(sum(high) / 4, abs=1e-4) and table[1]["observed"] == 0.5
    want = 2 / 6 * abs(sum(low) / 2 - 0.5) + 4 / 6 * abs(sum(high) / 4 - 0.5)
    assert ece == pytest.approx(want, abs=1e-6)


# ---------------------------------------------------------------------------------------------- data


def test_hh_rlhf_through_pairs(shared_data, micro_base):
    from chatforge.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(micro_base)
    f = shared_data / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"
    dc = load_config("rm", overrides=[f"data.path=[{f}]", "data.strict=false", "data.val_fraction=0.1"]).data
    data = load_pair_data(dc, tok, max_len=256, verbose=False)
    assert sum(data.meta["skipped"].values()) == 9  # 9 of 2312 are flawed: counted skips with strict=False
    dropped = data.meta["dropped_overlong"]  # overlong pairs: dropped and counted, never truncated
    assert dropped["train"] + dropped["val"] + len(data.train) + len(data.val) == 2303
    assert dropped["val"] + len(data.val) == round(2303 * 0.1)
    assert dropped["train"] > 0 and all(p.length <= 256 for p in data.train + data.val)
    for p in data.train[:50]:
        assert p.prompt[0] == tok.bos_id and p.prompt[-1] == tok.assistant_id
        assert p.chosen[-1] == tok.end_id and p.rejected[-1] == tok.end_id and p.chosen != p.rejected

def test_sharegpt_dpo_demo_through_pairs(shared_data, micro_base):
    from chatforge.tokenizer import ChatTokenizer

    tok = ChatTokenizer.load(micro_base)
    f = shared_data / "preference" / "dpo_en_demo.json"
    n = len(json.loads(f.read_text()))
    data = load_pair_data(load_config("rm", overrides=[f"data.path=[{f}]", "data.val_fraction=0"]).data, tok,
                          max_len=1_000_000, verbose=False)
    assert len(data.train) + sum(data.meta["skipped"].values()) == n and data.val == []
    assert all(p.prompt[-1] == tok.assistant_id and p.chosen[-1] == tok.end_id for p in data.train)


@pytest.mark.parametrize("line,problem", [
    ('{"prompt": "hi", "rejected": "no"}', "no 'chosen' field"),
    ('{"chosen": "\\n\\nHuman: hi", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: no"}', "assistant"),
    ('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yes", "rejected": "\\n\\nHuman: ho\\n\\nAssistant: no"}',
     "prompts differ"),
    ('{"prompt": "hi", "chosen": "yes", "rejected": "no"', "invalid JSON"),
])
def test_bad_input_names_file_and_line(tmp_path, micro_base, line, problem):
    from chatforge.tokenizer import ChatTokenizer

    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "hello", "chosen": "good answer", "rejected": "bad"}\n' + line + "\n")
    cfg = rm_cfg(micro_base, f, "train.max_steps=1")
    with pytest.raises(DataError) as e:
        load_pair_data(cfg.data, ChatTokenizer.load(micro_base), BLOCK, verbose=False)
    assert f"{f}:2:" in str(e.value) and problem in str(e.value)
    with pytest.raises(DataError, match=f"{f}:2:"):  # and through the stage itself
        rm.run(cfg, tmp_path / "out")


# ---------------------------------------------------------------------------------------------- training


def test_rm_learns_held_out_preferences(trained_rm):
    evals = rows(trained_rm, "eval")
    assert [r["step"] for r in evals] == [0, 25, 50]
    first, last = evals[0], evals[-1]
    assert last["val_pairs"] == 72
    assert last["val_accuracy"] > 0.7, last  # chance is 0.5 (measured ~0.8 after 50 steps)
    assert last["val_loss"] < first["val_loss"] - 0.1
    table = last["calibration"]
    assert sum(r["n"] for r in table) == 2 * 72 and all(0 <= r["observed"] <= 1 for r in table)
    info = json.loads((trained_rm / "chatforge.json").read_text())
    assert info["stage"] == "rm" and info["calibration"] == table and info["accuracy"] == last["val_accuracy"]
    assert info["metrics"]["eval_val_accuracy"] == last["val_accuracy"]
    norm = info["reward_norm"]
    assert norm["n"] == 512 and norm["std"] > 0
    cfg = json.loads((trained_rm / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["num_labels"] == 1
    assert cfg["pad_token_id"] == 1 and cfg["pad_token_id"] != 5


def test_normalised_scores_have_mean_0_std_1_on_the_reference_set(trained_rm, micro_base, pairs_file):
    from chatforge.rl.reward import RewardModelScorer

    scorer = RewardModelScorer(trained_rm)
    data = load_pair_data(rm_cfg(micro_base, pairs_file).data, scorer.tokenizer, BLOCK, verbose=False)
    seqs = rm.reference_sequences(data, 512)
    raw, norm = scorer.score_ids([s[:1] for s in seqs], [s[1:] for s in seqs])
    assert norm.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert norm.std().item() == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(raw, rm.score_sequences(scorer.model, seqs, scorer.pad_id))
    with torch.no_grad():  # the batched, padded scorer against each sequence alone (no padding at all)
        alone = torch.stack([scorer.model(torch.tensor([s]))[0, -1].float() for s in seqs[:16]])
    torch.testing.assert_close(raw[:16], alone, atol=1e-5, rtol=1e-5)


def test_transformers_scores_equal_ours(trained_rm):
    from transformers import AutoModelForSequenceClassification

    from chatforge.rl.reward import RewardModelScorer

    hf = AutoModelForSequenceClassification.from_pretrained(trained_rm).eval()
    scorer = RewardModelScorer(trained_rm)
    tok = scorer.tokenizer
    from chatforge.tokenizer import render_prompt, render_response

    p = [render_prompt(tok, [{"role": "user", "content": q}]) for q in ("What is 2 plus 9?", "Name a fruit.")]
    r = [render_response(tok, a) for a in ("Certainly! 2 plus 9 is 11.", "Apple, I think, is a fruit you like.")]
    raw, _ = scorer.score_ids(p, r)
    ids = pad([a + b for a, b in zip(p, r)], tok.pad_id, "right")
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=(ids != tok.pad_id).long()).logits[:, 0]
    torch.testing.assert_close(theirs, raw, rtol=1e-4, atol=1e-4)


def test_chatforge_score_ranks_chosen_above_rejected(trained_rm, capsys):
    from chatforge.cli import main

    prompt = "Hi! What do you get if you add 2 and 9?"
    with pytest.raises(SystemExit) as e:
        main(["score", "--model", str(trained_rm), "--prompt", prompt,
              "--response", "Certainly! 2 plus 9 is 11.", "--response", "2 plus 9 is 11, obviously. Whatever."])
    assert e.value.code == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    assert header == "score\traw\tresponse"
    good, bad = (float(line.split("\t")[0]) for line in lines)
    assert good > bad, lines


def test_score_refuses_a_causal_lm(micro_base, capsys):
    from chatforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["score", "--model", str(micro_base), "--prompt", "hi", "--response", "hello"])
    assert e.value.code == 2 and "not a reward model" in capsys.readouterr().err


def test_exact_resume(micro_base, pairs_file, tmp_path, monkeypatch):
    args = ("train.max_steps=6", "train.eval_every=3", "train.ckpt_every=0", "data.max_examples=64",
            "rm.norm_samples=16")
    full = tmp_path / "full"
    rm.run(rm_cfg(micro_base, pairs_file, *args), full)
    out = tmp_path / "cut"  # stopped inside step 4 (checkpoint after it), then resumed
    interrupted_then_resumed(monkeypatch, BucketBatcher, "next", 4,
                             lambda: rm.run(rm_cfg(micro_base, pairs_file, *args), out))
    keys = ("step", "loss", "accuracy", "margin", "reward_mean", "reward_std")
    assert [[r[k] for k in keys] for r in rows(out, "train")] == [[r[k] for k in keys] for r in rows(full, "train")]
    assert [r["val_loss"] for r in rows(out, "eval")] == [r["val_loss"] for r in rows(full, "eval")]
    a = json.loads((full / "chatforge.json").read_text())["reward_norm"]
    b = json.loads((out / "chatforge.json").read_text())["reward_norm"]
    assert a == b


def test_rm_needs_a_starting_model(pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="model.init"):
        rm.run(load_config("rm", MICRO, [f"data.path=[{pairs_file}]"]), tmp_path / "x")


# ---------------------------------------------------------------------------------------------- reward sources


def test_reward_sources(trained_rm, micro_base, tmp_path):
    from chatforge.config import RLConfig
    from chatforge.rl.reward import FunctionReward, RewardError, RewardModelScorer, load_reward
    from chatforge.tokenizer import ChatTokenizer, train_tokenizer

    f = load_reward(RLConfig(reward_fn="tests.rewards:letter_e"))
    raw, norm = f.score(None, None, ["q", "q"], ["eee", "abce"])
    assert raw.tolist() == [1.0, 0.25] and norm.tolist() == raw.tolist()
    s = load_reward(RLConfig(reward_model=str(trained_rm)))
    assert isinstance(s, RewardModelScorer)
    tok = s.tokenizer
    a, b = s.score([[0, 3, 4]], [tok.encode("hello") + [tok.end_id]], None, None)
    assert a.shape == (1,) and b.item() == pytest.approx((a.item() - s.mean) / s.std, rel=1e-6)
    s.check_tokenizer(ChatTokenizer.load(micro_base))  # the same tokenizer: fine
    other = train_tokenizer(["some other text entirely, a different vocabulary"] * 20, 300)
    with pytest.raises(RewardError, match="tokenizer"):
        s.check_tokenizer(other)
    for bad in (RLConfig(), RLConfig(reward_model=str(trained_rm), reward_fn="tests.rewards:letter_e")):
        with pytest.raises(ConfigError, match="exactly one"):
            load_reward(bad)
    for spec, msg in (("no_such_module_xyz:f", "cannot import"), ("tests.rewards:nope", "no attribute"),
                      ("math:pi", "not callable"), ("letter_e", "module:function")):
        with pytest.raises(ConfigError, match=msg) as e:
            FunctionReward(spec)
        assert spec in str(e.value)
    nan = FunctionReward("tests.rewards:letter_e")
    nan.fn = lambda p, r: float("nan")
    with pytest.raises(RewardError, match="non-finite"):
        nan.score_text(["q"], ["r"])
    with pytest.raises(Exception, match="not a reward model"):
        RewardModelScorer(micro_base)
    (tmp_path / "rm").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "rm" / name).write_bytes((trained_rm / name).read_bytes())
    with pytest.raises(RewardError, match="reward_norm"):
        RewardModelScorer(tmp_path / "rm")
    assert RewardModelScorer(tmp_path / "rm", normalize=False).std == 1.0


# ---------------------------------------------------------------------------------------------- dropout, weighting


def test_prompt_pair_weights_hand_values():
    """InstructGPT: a prompt whose pairs rank k distinct answers weighs each pair 1 / C(k, 2)."""
    from chatforge.data.pairs import TokenPair

    a, b, c, d = [10, 5], [11, 5], [12, 5], [13, 5]
    pairs = [TokenPair([0, 1], a, b, "x:1"), TokenPair([0, 1], a, c, "x:2"), TokenPair([0, 1], b, c, "x:3"),  # k=3
             TokenPair([0, 2], a, b, "x:4"),  # one pair: k=2
             TokenPair([0, 3], a, b, "x:5"), TokenPair([0, 3], c, d, "x:6")]  # 4 answers, only 2 of 6 pairs: k=4
    assert rm.prompt_pair_weights(pairs) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 1 / 6, 1 / 6])


def test_prompt_weighting_through_the_stage(micro_base, tmp_path):
    """rm.pair_weighting=prompt: the step's loss is the mean of the pairs' Bradley-Terry losses weighted 1/C(k,2)
    (one prompt with 3 ranked answers: 1/3 each; one with a single pair: 1), computed by hand from the initial
    reward model; accuracy stays a plain fraction of pairs. The default 'pair' is the plain mean."""
    from chatforge.data.pairs import collate_unique, load_pair_data

    rows_in = [("Name a fruit.", "Apple.", "Stone."), ("Name a fruit.", "Apple.", "Car."),
               ("Name a fruit.", "Stone.", "Car."), ("Say hi.", "Hi there!", "No.")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows_in))
    common = ["data.val_fraction=0", "train.max_steps=1", "train.eval_every=0", "train.batch_size=4",
              "train.ckpt_every=0", "train.seed=5"]
    got = {}
    for mode in ("prompt", "pair"):
        cfg = rm_cfg(micro_base, path, *common, f"rm.pair_weighting={mode}")
        rm.run(cfg, tmp_path / mode)
        got[mode] = rows(tmp_path / mode, "train")[0]
    policy, _, tok = load_causal_lm(micro_base, "cpu")
    data = load_pair_data(cfg.data, tok, 10_000, verbose=False)
    torch.manual_seed(5)
    model = rm.reward_model_from(policy, cfg.lora).eval()
    with torch.no_grad():
        r_c, r_r = rm.pair_rewards(model, collate_unique(list(data.train), tok.pad_id))
    from chatforge import losses

    bt = losses.bradley_terry(r_c, r_r).double()  # (4,)
    w = torch.tensor([1 / 3 if p.prompt == data.train[0].prompt else 1.0 for p in data.train], dtype=torch.float64)
    assert sorted(w.tolist()) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert got["prompt"]["loss"] == pytest.approx(((w * bt).sum() / w.sum()).item(), rel=1e-5)
    assert got["pair"]["loss"] == pytest.approx(bt.mean().item(), rel=1e-5)
    assert abs(got["prompt"]["loss"] - got["pair"]["loss"]) > 1e-4  # the weighting changes the number
    assert got["prompt"]["accuracy"] == got["pair"]["accuracy"] == (r_c > r_r).double().mean().item()


def test_reward_model_has_no_dropout(micro_base, tmp_path):
    """A starting model saved with dropout: the reward model compares two forward passes, so its dropout is off
    (train-mode forwards are deterministic) and the saved reward model records none."""
    import shutil

    base = tmp_path / "base_dropout"
    shutil.copytree(micro_base, base)
    conf = json.loads((base / "config.json").read_text())
    conf["attention_dropout"] = 0.3
    (base / "config.json").write_text(json.dumps(conf))
    policy, _, _ = load_causal_lm(base, "cpu")
    model = rm.reward_model_from(policy, load_config("rm", MICRO).lora).train()
    ids = torch.tensor([[0, 5, 6, 7, 8, 9]])
    torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)
    torch.testing.assert_close(model(ids), model.eval()(ids), rtol=0, atol=0)
    path = write_demo_pairs(tmp_path / "p.jsonl", 16)
    rm.run(rm_cfg(base, path, "train.max_steps=1", "train.eval_every=0", "train.ckpt_every=0", "rm.norm_samples=8"),
           tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "config.json").read_text())["attention_dropout"] == 0.0


def test_prompt_rows_score_each_answer_as_its_own_sequence(monkeypatch):
    """A native reward model reads a row per prompt, its distinct answers branching from it: every pair's rewards
    and the gradient equal those of the distinct sequences read one by one, in several length groups; an answer
    shared by pairs is one branch."""
    from chatforge.config import ModelConfig
    from chatforge.data.pairs import TokenPair, collate_prompt_rows
    from chatforge.model.heads import ScalarModel

    torch.manual_seed(0)
    model = ScalarModel(ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=64), 50)
    g = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(1, 50, (n,), generator=g).tolist()  # noqa: E731
    p1, p2 = ids(9), ids(2)
    a, b, c, d, e = ids(4), ids(7), ids(1), ids(30), ids(3)
    pairs = [TokenPair(p1, a, b, "x:1"), TokenPair(p1, a, c, "x:2"), TokenPair(p1, c, b, "x:3"),
             TokenPair(p2, d, e, "x:4")]
    batch = collate_prompt_rows(pairs, 0)
    assert batch.ids.shape == (2, 2 + 30 + 3) and batch.branches[0].tolist() == [0] * 9 + [1] * 4 + [2] + [3] * 7 + [-1] * 14
    assert batch.chosen.tolist() == [0, 0, 1, 2] and batch.rejected.tolist() == [3, 1, 3, 4]  # a, c, d; b, c, b, e
    assert int(batch.tokens) == sum(len(s) for s in (p1 + a, p1 + b, p1 + c, p2 + d, p2 + e))
    from chatforge.model import heads
    monkeypatch.setattr(heads, "call_overhead_tokens", lambda device, **kw: 4.0)  # each row its own group
    r_c, r_r = rm.pair_rewards(model, batch)

    def alone(p, ans):  # the sequence prompt + answer by itself, read at its last token
        return model(torch.tensor([p + ans]))[0, -1]

    want_c = torch.stack([alone(p.prompt, p.chosen) for p in pairs])
    want_r = torch.stack([alone(p.prompt, p.rejected) for p in pairs])
    torch.testing.assert_close(r_c, want_c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(r_r, want_r, atol=1e-5, rtol=1e-5)
    (r_c - 2 * r_r).sum().backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (want_c - 2 * want_r).sum().backward()
    for x, y in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert isinstance(rm.collate_for(model, pairs, 0, "cpu"), type(batch))
    assert not isinstance(rm.collate_for(torch.nn.Sequential(), pairs, 0, "cpu"), type(batch))  # any other model


def test_reward_scorer_reads_repeated_prompts_once_with_the_same_scores(trained_rm):
    """GRPO's groups (each prompt several times): the scorer's prompt rows give every sequence the score it gets
    alone, across several passes of at most batch_size prompts."""
    from chatforge.rl.reward import RewardModelScorer

    s = RewardModelScorer(trained_rm, batch_size=2)
    tok = s.tokenizer
    prompts = [[0, 3, 4], [0, 5], [0, 3, 4, 6, 7, 8]]
    answers = ["hello", "a longer answer here", "no", "yes please", "x", "the end"]
    p_ids = [prompts[i % 3] for i in range(6)] + [prompts[0]]  # each prompt twice, the first three times
    r_ids = [tok.encode(a) + [tok.end_id] for a in answers] + [tok.encode("again") + [tok.end_id]]
    raw, norm = s.score_ids(p_ids, r_ids)
    alone = torch.cat([s.score_ids([p], [r])[0] for p, r in zip(p_ids, r_ids)])  # one sequence per call
    torch.testing.assert_close(raw, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm, (alone - s.mean) / s.std, atol=1e-5, rtol=1e-5)
