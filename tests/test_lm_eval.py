"""`chatforge eval` through lm-evaluation-harness: on a micro model with tiny local tasks (lm-eval YAMLs whose
data_files are local JSONL files written here) it runs and writes its results, and its log-likelihoods,
rolling log-likelihoods, greedy generations and task metrics equal those of lm-eval's own `hf` model on the
same directory. The shipped tasks read the public data when it is there."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from chatforge import cli  # noqa: E402
from chatforge.lm_eval.model import ChatforgeLM  # noqa: E402
from chatforge.lm_eval.tasks.chatforge_data import wikitext_documents  # noqa: E402
from chatforge.tokenizer import render_prompt  # noqa: E402
from tests.micro_models import TEXTS, make_model_dir  # noqa: E402

MC_DOCS = [
    {"question": "Review: a charming and often affecting journey .\nSentiment:", "choices": ["negative", "positive"],
     "answer": 1},
    {"question": "Review: dull and slow .\nSentiment:", "choices": ["negative", "positive"], "answer": 0},
    {"question": "The film is", "choices": ["good", "bad", "a journey"], "answer": 2},
    {"question": "Jokes", "choices": [" fall flat", " are told"], "answer": 0},
]
PPL_DOCS = [{"text": TEXTS[0]}, {"text": " ".join(TEXTS * 6)}]  # the second is longer than the context (64)


def write_local_tasks(folder: Path) -> Path:
    """Two lm-eval task YAMLs reading local JSONL files: multiple choice and rolling perplexity."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC_DOCS))
    (folder / "ppl.jsonl").write_text("".join(json.dumps(d) + "\n" for d in PPL_DOCS))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {folder / 'mc.jsonl'}
output_type: multiple_choice
validation_split: validation
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
doc_to_choice: choices
metric_list:
  - metric: acc
""")
    (folder / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'ppl.jsonl'}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("lm") / "micro", seed=3)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    return write_local_tasks(tmp_path_factory.mktemp("tasks"))


@pytest.fixture(scope="module")
def lms(model_dir):
    """(chatforge's LM, lm-eval's own hf LM) on the same directory, on the CPU."""
    from lm_eval.models.huggingface import HFLM

    ours = ChatforgeLM(str(model_dir), device="cpu", batch_size=3)
    theirs = HFLM(pretrained=str(model_dir), device="cpu", batch_size=3, dtype="float32")
    return ours, theirs


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_loglikelihoods_equal_lm_eval_hf(lms):
    ours, theirs = lms
    pairs = [(d["question"], " " + c) for d in MC_DOCS for c in d["choices"]]
    pairs += [("", "the film"), ("a great story told with", " wit"), ("x " * 80, " journey")]  # empty, long context
    a = ours.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    b = theirs.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    assert len(a) == len(b) == len(pairs)
    for (la, ga), (lb, gb), p in zip(a, b, pairs):
        assert la == pytest.approx(lb, rel=1e-5, abs=1e-4), p
        assert ga == gb, p
    assert len({round(x, 3) for x, _ in a}) > len(a) // 2  # the model tells continuations apart

    texts = [(d["text"],) for d in PPL_DOCS] + [("a",)]
    ra = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts), disable_tqdm=True)
    rb = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", texts), disable_tqdm=True)
    assert len(ours.tok_encode(PPL_DOCS[1]["text"])) > 2 * ours.max_length  # several windows
    for x, y in zip(ra, rb):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-4)


def test_greedy_generation_equals_lm_eval_hf(lms):
    ours, theirs = lms
    gen = [("the film is", {"until": ["."], "max_gen_toks": 12, "do_sample": False}),
           ("a great", {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})]
    a = ours.generate_until(requests("generate_until", gen), disable_tqdm=True)
    b = theirs.generate_until(requests("generate_until", gen), disable_tqdm=True)
    assert a == b and all(isinstance(x, str) for x in a) and any(x.strip() for x in a)


def test_chat_template_is_chatforge_format(lms, model_dir):
    from chatforge.model.load import load_tokenizer

    ours, _ = lms
    msgs = [{"role": "user", "content": "is the film good?"}]
    text = ours.apply_chat_template(msgs)
    assert text == "<|endoftext|><|user|>is the film good?<|end|><|assistant|>"
    assert ours.tok_encode(text) == render_prompt(load_tokenizer(model_dir), msgs)


def test_eval_command_writes_results_equal_to_hf(model_dir, tasks_dir, tmp_path, capsys):
    from lm_eval import simple_evaluate

    from chatforge.lm_eval.run import task_manager

    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--model", str(model_dir), "--tasks", "tiny_mc,tiny_ppl", "--include-path",
                  str(tasks_dir), "--device", "cpu", "--batch-size", "4"])
    assert e.value.code == 0
    shown = capsys.readouterr().out
    assert "tiny_mc" in shown and "word_perplexity" in shown
    saved = json.loads((model_dir / "lm_eval.json").read_text())
    assert set(saved["results"]) == {"tiny_mc", "tiny_ppl"}

    from lm_eval.models.huggingface import HFLM

    hf = HFLM(pretrained=str(model_dir), device="cpu", batch_size=4, dtype="float32")
    ref = simple_evaluate(model=hf, tasks=["tiny_mc", "tiny_ppl"], task_manager=task_manager(["tiny_mc"], [tasks_dir]),
                          log_samples=False, bootstrap_iters=0)["results"]
    assert saved["results"]["tiny_mc"]["acc,none"] == ref["tiny_mc"]["acc,none"]
    for m in ("word_perplexity,none", "bits_per_byte,none"):
        assert saved["results"]["tiny_ppl"][m] == pytest.approx(ref["tiny_ppl"][m], rel=1e-5)
    # a second task run keeps the first one's results
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", str(model_dir), "--tasks", "tiny_mc", "--include-path", str(tasks_dir),
                  "--device", "cpu", "--output", str(tmp_path / "r.json")])
    assert set(json.loads((tmp_path / "r.json").read_text())["results"]) == {"tiny_mc"}


@pytest.mark.slow  # an unknown name makes lm-eval index its thousands of built-in tasks (~40 s)
def test_unknown_task_is_a_clear_error(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--model", str(model_dir), "--tasks", "chatforge_sst2,no_such_task_here", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no_such_task_here" in err and "chatforge_sst2" in err


def test_wikitext_documents():
    text = " = A = \n text a \n = = Sec = = \n more a \n = B = \n text b \n"
    assert wikitext_documents(text) == ["= A = \n text a \n = = Sec = = \n more a", "= B = \n text b"]


def test_shipped_tasks_on_the_public_data(model_dir, shared_data, tmp_path):
    from chatforge.lm_eval.run import evaluate_model

    res = evaluate_model(model_dir, ["chatforge_sst2", "chatforge_wikitext2"], device="cpu", limit=2,
                         data_dir=shared_data, output=tmp_path / "r.json", batch_size=8)
    r = res["results"]
    assert r["chatforge_sst2"]["acc,none"] in (0.0, 0.5, 1.0)
    assert res["n-samples"]["chatforge_sst2"]["original"] == 872
    assert math.isfinite(r["chatforge_wikitext2"]["bits_per_byte,none"])
    assert res["n-samples"]["chatforge_wikitext2"]["original"] > 50  # articles, not lines
