"""`chatforge pipeline` on the user's own recipe: files written by the test, a tiny local Llama model built here,
answers ranked by a program or by people (labels/labels.jsonl), evaluation and the report card; bad input."""

from __future__ import annotations

import json
import os
import random
import shutil

import pytest
import torch

from chatforge.config import ConfigError
from chatforge.data.labels import LabelsError, ranking_pairs, read_candidates, read_labels
from chatforge.demo.rewards import letter_e, rank_letter_e
from chatforge.pipeline import Pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE_MICRO = os.path.join(ROOT, "configs", "recipe_micro.yaml")
RECIPE = os.path.join(ROOT, "configs", "recipe.yaml")
NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eve", "Finn"]
THINGS = ["apples", "boats", "clocks", "drums", "eggs", "ferns"]


@pytest.fixture(autouse=True, scope="module")
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A user's recipe inputs: text, demonstrations, prompts, and a tiny local Llama-family model directory."""
    import transformers as T

    from chatforge.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("my")
    rng = random.Random(0)
    text = [f"{rng.choice(NAMES)} has {rng.randint(2, 9)} {rng.choice(THINGS)}. They like them very much.\n"
            for _ in range(400)]
    (d / "text.txt").write_text("".join(text))
    demos = [{"prompt": f"What does {n} like?", "response": f"{n} likes {rng.choice(THINGS)}."}
             for n in (rng.choice(NAMES) for _ in range(60))]
    prompts = [{"prompt": f"Tell me about {rng.choice(NAMES)} and the {rng.choice(THINGS)}. ({i})"} for i in range(30)]
    tok = train_tokenizer(text, 320)
    cfg = T.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                        tie_word_embeddings=True, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model_dir = d / "tiny-llama"
    T.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save(model_dir)
    return {"dir": d, "text": d / "text.txt", "sft": write_jsonl(d / "demos.jsonl", demos),
            "prompts": write_jsonl(d / "prompts.jsonl", prompts), "model": model_dir}


def recipe_args(files, *extra):
    """SFT from the local Llama model -> RM on program-ranked answers -> PPO, evaluated with a judge too."""
    return [f"stages.sft.model.init={files['model']}", f"stages.sft.data.path={files['sft']}",
            f"stages.ppo.data.path={files['prompts']}", "recipe.stages=[sft,rm,ppo]",
            "recipe.comparisons.max_prompts=8", "recipe.eval.heldout_prompts=6",
            "recipe.eval.judge=chatforge.demo.rewards:letter_e", "train.max_steps=4", *extra]


def run(out, args, **kw):
    return Pipeline(RECIPE_MICRO, out, args, verbose=False, **kw).run()


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def expected_pairs(labels) -> set:
    """(prompt, chosen, rejected) texts of rankings (tie groups, best first), expanded by hand."""
    out = set()
    for lb in labels:
        texts = {a["id"]: a["text"] for a in lb["answers"]}
        for i, better in enumerate(lb["ranking"]):
            for worse in lb["ranking"][i + 1:]:
                out |= {(json.dumps(lb["prompt"]), texts[c], texts[r]) for c in better for r in worse}
    return out


def card(root) -> str:
    """The report card's own words (the models' answers shown side by side left out)."""
    return (root / "report.md").read_text().split("## Side by side")[0]


def pair_set(path) -> set:
    return {(json.dumps(r["prompt"]), r["chosen"], r["rejected"]) for r in lines(path)}


@pytest.fixture(scope="module")
def program_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("recipe") / "run"
    return out, run(out, recipe_args(files))


# ------------------------------------------------------------------------------------- a program as labeller
@pytest.mark.timeout(300)
def test_micro_recipe_end_to_end_from_a_local_llama(program_run, files):
    out, results = program_run
    assert list(results) == ["data", "sft", "pairs", "rm", "ppo", "eval", "report"]  # no tokenizer, no pretrain
    assert all(r.status == "ran" for r in results.values())
    assert not (out / "base").exists() and not (out / "tokenizer").exists()
    info = {d: json.loads((out / d / "chatforge.json").read_text()) for d in ("sft", "rm", "ppo")}
    assert info["sft"]["config"]["model"]["init"] == str(files["model"])
    assert info["rm"]["config"]["model"]["init"] == str(out / "sft")
    assert info["ppo"]["config"]["model"]["init"] == str(out / "sft")
    assert info["ppo"]["config"]["rl"]["reward_model"] == str(out / "rm")
    assert info["rm"]["config"]["data"]["path"] == [str(out / "pairs" / "train.jsonl")]
    # evaluation prompts: 6 of the 30 RL prompts, held out of RL training
    rl = lines(out / "data" / "rl_prompts.jsonl")
    ev = lines(out / "data" / "eval_prompts.jsonl")
    assert len(rl) == 24 and len(ev) == 6 and not {r["prompt"] for r in rl} & {r["prompt"] for r in ev}
    assert info["ppo"]["config"]["data"]["path"] == [str(out / "data" / "rl_prompts.jsonl")]
    # the pairs are exactly the program's rankings: every answer against every lower-scored one, per prompt
    cands = list(read_candidates(out / "pairs" / "candidates.jsonl").values())
    assert len(cands) == 8
    want = set()
    for c in cands:
        texts = [a["text"] for a in c.answers]
        scores = rank_letter_e(c.prompt, texts)
        want |= {(json.dumps(c.prompt), a, b) for a, sa in zip(texts, scores) for b, sb in zip(texts, scores) if sa > sb}
    assert want and pair_set(out / "pairs" / "train.jsonl") == want
    # evaluation: reward model and judge, lengths, endings, KL to SFT, win rates over SFT
    res = json.loads((out / "eval" / "results.json").read_text())
    assert set(res["models"]) == {"sft", "ppo"} and res["n_prompts"] == 6
    for name in ("sft", "ppo"):
        answers = lines(out / "eval" / f"{name}.jsonl")
        assert [a["prompt"] for a in answers] == [e["prompt"] for e in ev]
        m = res["models"][name]
        assert m["judge_score"] == pytest.approx(sum(letter_e(a["prompt"], a["response"]) for a in answers) / 6)
        assert m["length"] == pytest.approx(sum(a["tokens"] for a in answers) / 6)
        assert m["ends"] == pytest.approx(sum(a["finished"] for a in answers) / 6)
        assert "rm_score" in m and "rm_score_se" in m
    assert res["models"]["sft"]["kl_to_sft"] == 0.0 and res["models"]["ppo"]["kl_to_sft"] != 0.0
    for by in ("rm", "judge"):
        w = res["models"]["ppo"][f"win_rate_vs_sft_{by}"]
        assert w["wins"] + w["ties"] + w["losses"] == 6
    # the card says what measured the run, and nothing of gold labels or label noise
    md = card(out)
    assert "reward-model score" in md and "judge score" in md and "win rate vs SFT (reward model)" in md
    assert "gold" not in md.lower() and "noise" not in md.lower()
    assert (out / "plots" / "eval_scores.png").is_file()
    side = (out / "report.md").read_text().split("## Side by side on the evaluation prompts")[1]
    assert "| prompt | sft | ppo |" in side and len([x for x in side.splitlines() if x.startswith("| Tell me")]) == 4


@pytest.mark.timeout(300)
def test_recipe_rerun_skips_and_changed_data_reruns_downstream(program_run, files, tmp_path):
    src, _ = program_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    status = {k: r.status for k, r in run(out, recipe_args(files)).items()}
    assert {k: status[k] for k in ("data", "sft", "pairs", "rm", "ppo")} == dict.fromkeys(
        ("data", "sft", "pairs", "rm", "ppo"), "skipped")
    # new demonstrations: sft and everything after it rerun
    sft = files["dir"] / "demos2.jsonl"
    shutil.copy(files["sft"], sft)
    with open(sft, "a") as f:
        f.write(json.dumps({"prompt": "Who are you?", "response": "A small model."}) + "\n")
    args = [a for a in recipe_args(files) if not a.startswith("stages.sft.data.path")] + [f"stages.sft.data.path={sft}"]
    status = {k: r.status for k, r in run(out, args).items()}
    assert status["data"] == "skipped" and all(status[k] == "ran" for k in ("sft", "pairs", "rm", "ppo"))
    # --force rm reruns rm and what follows; --stages picks a subset with its prerequisites
    status = {k: r.status for k, r in run(out, args, force=["rm"]).items()}
    assert status["sft"] == status["pairs"] == "skipped" and status["rm"] == status["ppo"] == "ran"
    assert {k: r.status for k, r in run(out, args, stages=["rm"]).items()} == {
        "data": "skipped", "pairs": "skipped", "rm": "skipped"}


# ------------------------------------------------------------------------------------------ people as labellers
@pytest.mark.timeout(300)
def test_people_rank_candidates_and_exactly_their_rankings_train_the_rm(files, tmp_path, capsys):
    out = tmp_path / "run"
    args = recipe_args(files, "recipe.stages=[sft,rm]", "recipe.comparisons.source=people",
                       "recipe.comparisons.max_prompts=4", f"recipe.comparisons.prompts={files['prompts']}")
    pipe = Pipeline(RECIPE_MICRO, out, args, verbose=False)
    results = pipe.run()
    assert results["pairs"].status == "waiting" and "rm" not in results and not (out / "rm").exists()
    cand_path, labels_path = out / "labels" / "candidates.jsonl", out / "labels" / "labels.jsonl"
    assert f"chatforge serve --model {out / 'sft'} --labels-dir {out / 'labels'} --candidates {cand_path}" in pipe.waiting
    assert str(labels_path) in pipe.waiting and "0 of the 4" in pipe.waiting
    cands = lines(cand_path)
    assert len(cands) == 4 and all(len(c["answers"]) >= 2 for c in cands[:3])
    assert all(set(c) == {"prompt_id", "prompt", "answers"} for c in cands)
    # a person ranks three prompts: a strict order, a tie group, one answer left unranked
    a = [[x["id"] for x in c["answers"]] for c in cands]
    labels = [
        {**cands[0], "ranking": [[i] for i in reversed(a[0])], "labeler": "ann", "time": "2026-01-01T10:00:00"},
        {**cands[1], "ranking": [a[1][:2], a[1][2:]] if len(a[1]) > 2 else [[a[1][0]], [a[1][1]]], "time": "t"},
        {**cands[2], "ranking": [[a[2][1]], [a[2][0]]], "time": "t"},  # a third answer (if any) unranked
    ]
    write_jsonl(labels_path, labels[:2])
    results = Pipeline(RECIPE_MICRO, out, args, verbose=False).run()  # 2 of 4: still waiting
    assert results["pairs"].status == "waiting" and results["sft"].status == "skipped"
    from chatforge import cli

    with pytest.raises(SystemExit) as e:  # the command says what to do next and exits with status 3
        cli.main(["pipeline", "--config", RECIPE_MICRO, "--out", str(out), "--quiet"] + [f"--{a}" for a in args])
    assert e.value.code == 3 and "waiting for people's rankings: 2 of the 4 prompts" in capsys.readouterr().out
    write_jsonl(labels_path, labels)
    results = Pipeline(RECIPE_MICRO, out, args + ["recipe.comparisons.min_labels=3"], verbose=False).run()
    assert results["pairs"].status == "ran" and results["rm"].status == "ran"
    want = expected_pairs(labels)
    assert pair_set(out / "pairs" / "train.jsonl") == want
    n = len(want)
    assert n == sum(len(p) for p in (ranking_pairs(lb["ranking"]) for lb in labels))
    rm = json.loads((out / "rm" / "chatforge.json").read_text())
    assert rm["config"]["data"]["path"] == [str(out / "pairs" / "train.jsonl")]
    d = rm["data"]  # every one of them reached the RM, nothing else (none skipped or dropped)
    assert d["train_pairs"] + d["val_pairs"] == n and not d["skipped"] and d["dropped_overlong"] == {"train": 0, "val": 0}
    # a bad labels file stops with file, line and problem; nothing labelled or trained is lost
    before = (labels_path.read_bytes(), cand_path.read_bytes(), (out / "rm" / "model.safetensors").stat().st_mtime_ns)
    with open(labels_path, "a") as f:
        f.write(json.dumps({**cands[3], "ranking": [["nope"]], "time": "t"}) + "\n")
    with pytest.raises(LabelsError, match=rf"{labels_path}:4: unknown answer id 'nope'"):
        Pipeline(RECIPE_MICRO, out, args + ["recipe.comparisons.min_labels=3"], verbose=False).run()
    assert cand_path.read_bytes() == before[1] and (out / "rm" / "model.safetensors").stat().st_mtime_ns == before[2]
    assert labels_path.read_bytes().startswith(before[0])


def test_labels_reader_errors_name_file_line_and_problem(tmp_path):
    cands = tmp_path / "candidates.jsonl"
    write_jsonl(cands, [{"prompt_id": "p1", "prompt": "hi", "answers": [{"id": "a", "text": "x"}, {"id": "b", "text": "y"},
                                                                      {"id": "c", "text": "z"}]}])
    by_id = read_candidates(cands)
    good = {"prompt_id": "p1", "prompt": "hi", "ranking": [["a"], ["b", "c"]], "time": "t"}
    f = tmp_path / "labels.jsonl"
    cases = [({**good, "ranking": [["a"], ["a", "b"]]}, "the ranking names answer 'a' twice"),
             ({**good, "ranking": [["a"], ["q"]]}, "unknown answer id 'q' for prompt 'p1'"),
             ({**good, "prompt_id": "p9"}, "unknown prompt_id 'p9'"),
             ({**good, "ranking": ["a", "b"]}, "'ranking' must be a list of tie groups"),
             ({**good, "prompt": "other"}, "the prompt differs")]
    for rec, problem in cases:
        f.write_text(json.dumps(good) + "\n\n" + json.dumps(rec) + "\n")
        with pytest.raises(LabelsError, match=f"{f}:3: " + problem.replace("(", r"\(")):
            read_labels(f, by_id)
    f.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(LabelsError, match=f"{f}:2: invalid JSON"):
        read_labels(f, by_id)
    # the last ranking of a prompt wins; tie groups expand to better x worse pairs
    f.write_text(json.dumps({**good, "ranking": [["c"], ["a"]]}) + "\n" + json.dumps(good) + "\n")
    (lb,) = read_labels(f, by_id)
    assert ranking_pairs(lb.ranking) == [("a", "b"), ("a", "c")]
    assert ranking_pairs([["a"], ["b", "c"], ["d"]]) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "d"), ("c", "d")]


# ----------------------------------------------------------------------------------------------------- bad input
def test_bad_recipes_stop_before_any_work(files, tmp_path):
    out = tmp_path / "run"
    cases = [
        (["stages.sft.data.path=/no/such.jsonl"], "stage sft: stages.sft.data.path: no such file or folder '/no/such.jsonl'"),
        (["recipe.stages=[sft,rm,ppo,sfft]"], "recipe.stages: unknown stage 'sfft'"),
        (["recipe.stages=[sft,ppo]"], "stage ppo: no reward: add rm to recipe.stages, or set stages.ppo.rl.reward_model"),
        (["recipe.stages=[rm]"], "stage rm: no starting model: add sft to recipe.stages or set stages.rm.model.init"),
        (["stages.sft.model.init=null", "recipe.stages=[sft]"], "stage sft: no starting model: add pretrain"),
        (["recipe.comparisons.ranker=null"], "stage rm: recipe.comparisons.source=program needs recipe.comparisons.ranker"),
        (["recipe.comparisons.source=file"], "stage rm: stages.rm.data.path is empty"),
        (["recipe.eval.prompts=/no/eval.jsonl"], "stage eval: recipe.eval.prompts: no such file or folder"),
        (["recipe.stages=[pretrain,sft]", "stages.sft.model.init=null"], "stage pretrain: stages.pretrain.data.path is empty"),
    ]
    for extra, msg in cases:
        with pytest.raises(ConfigError) as e:
            Pipeline(RECIPE_MICRO, out, recipe_args(files) + extra, verbose=False)
        assert msg in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))
    assert not out.exists()


def test_report_on_hand_run_stage_folders_and_on_neither(program_run, tmp_path, capsys):
    from chatforge import cli

    src, _ = program_run
    hand = tmp_path / "hand"
    for name, d in (("my-sft", "sft"), ("my-rm", "rm")):
        shutil.copytree(src / d, hand / name)
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(hand)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "| sft |" in out and "| rm |" in out
    md = card(hand)
    assert "A folder of stage directories: sft (my-sft/), rm (my-rm/)" in md and "gold" not in md.lower()
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        cli.main(["report", str(tmp_path / "empty")])
    assert e.value.code == 2 and "neither a pipeline run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- the public-data recipe
@pytest.mark.timeout(600)
def test_public_recipe_micro_on_shared_data(shared_data, tmp_path):
    """configs/recipe.yaml at micro size on the public files: pretraining text, Alpaca demonstrations, HH-RLHF
    comparisons, OpenAssistant prompts (paths as overrides, as the README shows)."""
    out = tmp_path / "public"
    micro = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=1", "model.block_size=256",
             "tokenizer.vocab_size=320", "train.max_steps=2", "train.batch_size=4", "train.eval_every=0",
             "train.eval_batches=1", "train.ckpt_every=0", "train.progress=false", "train.threads=1",
             "data.max_examples=64", "sft.n_eval_prompts=0", "rl.max_new_tokens=8", "rl.prompts_per_step=2",
             "rl.ppo_epochs=1", "recipe.eval.max_prompts=4", "recipe.eval.max_new_tokens=8", "recipe.eval.side_by_side=2"]
    paths = [f"stages.pretrain.data.path={shared_data / 'pretrain' / 'tinystories_sample.txt'}",
             f"stages.sft.data.path={shared_data / 'sft' / 'alpaca_en_demo.json'}",
             f"stages.rm.data.path={shared_data / 'preference' / 'hh_rlhf_harmless_base_test.jsonl.gz'}",
             f"stages.ppo.data.path={shared_data / 'prompts' / 'oasst_prompt_lottery_en_250_text.jsonl'}",
             f"recipe.eval.prompts={shared_data / 'prompts' / 'oasst_en_100_text.jsonl'}"]
    results = Pipeline(RECIPE, out, paths + micro, verbose=False).run()
    assert list(results) == ["data", "tokenizer", "pretrain", "sft", "rm", "ppo", "eval", "report"]
    res = json.loads((out / "eval" / "results.json").read_text())
    assert set(res["models"]) == {"base", "sft", "ppo"} and res["n_prompts"] == 4
    assert res["reward_model"] == str(out / "rm") and "win_rate_vs_sft_rm" in res["models"]["ppo"]
    md = card(out)
    assert "gold" not in md.lower() and "reward-model score" in md


@pytest.mark.timeout(300)
def test_recipe_variants_dpo_and_grpo_with_a_reward_function(files, tmp_path):
    """sft -> dpo on program-ranked answers (no RM); sft -> grpo with rl.reward_fn (no RM, no comparisons)."""
    out = tmp_path / "dpo"
    results = run(out, recipe_args(files, "recipe.stages=[sft,dpo]", f"recipe.comparisons.prompts={files['prompts']}",
                                   "recipe.eval.prompts=" + str(files["prompts"]), "recipe.eval.max_prompts=4"))
    assert list(results) == ["data", "sft", "pairs", "dpo", "eval", "report"]
    dpo = json.loads((out / "dpo" / "chatforge.json").read_text())
    assert dpo["config"]["model"]["init"] == str(out / "sft")
    assert dpo["config"]["data"]["path"] == [str(out / "pairs" / "train.jsonl")]
    res = json.loads((out / "eval" / "results.json").read_text())
    assert set(res["models"]) == {"sft", "dpo"} and res["reward_model"] is None
    assert "win_rate_vs_sft_judge" in res["models"]["dpo"] and "rm_score" not in res["models"]["dpo"]
    out = tmp_path / "grpo"
    results = run(out, recipe_args(files, "recipe.stages=[sft,grpo]", "stages.grpo.rl.reward_fn=tests.rewards:letter_e",
                                   "stages.grpo.rl.group_size=2", "stages.grpo.rl.prompts_per_step=2",
                                   f"stages.grpo.data.path={files['prompts']}"))
    assert list(results) == ["data", "sft", "grpo", "eval", "report"]
    grpo = json.loads((out / "grpo" / "chatforge.json").read_text())
    assert grpo["config"]["rl"]["reward_fn"] == "tests.rewards:letter_e" and grpo["config"]["rl"]["reward_model"] is None
    assert grpo["config"]["data"]["path"] == [str(out / "data" / "rl_prompts.jsonl")]
    md = card(out)
    assert "judge score" in md and "reward-model score" not in md and "gold" not in md.lower()


@pytest.mark.timeout(300)
def test_recipe_rl_from_an_existing_sft_and_reward_model(program_run, files, tmp_path):
    """recipe.stages=[ppo]: the policy and the reward model come from elsewhere (model.init, rl.reward_model);
    the evaluation takes the policy's starting model as the SFT model and scores with that reward model."""
    src, _ = program_run
    out = tmp_path / "run"
    args = recipe_args(files, "recipe.stages=[ppo]", f"stages.ppo.model.init={src / 'sft'}",
                       f"stages.ppo.rl.reward_model={src / 'rm'}")
    results = run(out, args)
    assert list(results) == ["data", "ppo", "eval", "report"]
    ppo = json.loads((out / "ppo" / "chatforge.json").read_text())
    assert ppo["config"]["model"]["init"] == str(src / "sft") and ppo["config"]["rl"]["reward_model"] == str(src / "rm")
    res = json.loads((out / "eval" / "results.json").read_text())
    assert res["sft"] == str(src / "sft") and res["reward_model"] == str(src / "rm") and set(res["models"]) == {"sft", "ppo"}
    assert "win_rate_vs_sft_rm" in res["models"]["ppo"]
    assert not (src / "sft" / "eval").exists()  # nothing written into the models given from elsewhere
    # a missing reward model directory stops before any work
    with pytest.raises(ConfigError, match="stage ppo: stages.ppo.rl.reward_model: no such model directory"):
        Pipeline(RECIPE_MICRO, tmp_path / "other", args + ["stages.ppo.rl.reward_model=/no/rm"], verbose=False)


def test_eval_logprobs_of_answers_equal_the_engine_s(files):
    """KL to SFT is sum log pi - sum log pi_sft over the sampled ids: the teacher-forced log-probs of an answer
    must equal the ones the engine sampled it with (same model), so a model's KL to itself is 0."""
    from chatforge.model.load import load_causal_lm
    from chatforge.recipe_eval import answer_logprobs, sample_answers

    model, _, tok = load_causal_lm(files["model"])
    prompts = ["Tell me about Ada.", [{"role": "user", "content": "hi"}], "What does Ben like?"]
    rows = sample_answers(model, tok, prompts, max_new_tokens=12, seed=3, batch_size=2)
    assert [r["tokens"] for r in rows] == [len(r["ids"]) for r in rows] and all(r["tokens"] > 0 for r in rows)
    again = answer_logprobs(model, tok, prompts, [r["ids"] for r in rows], batch_size=2)
    assert again == pytest.approx([r["logp"] for r in rows], abs=1e-4)
