"""The demo world: deterministic files, a rich corpus, held-out prompts, the gold judge and preference labels."""

import json
import random
import re
import statistics

import pytest

from chatforge.demo import (
    STYLES, WEIGHTS, demonstrate, eval_prompts, generate_corpus, gold_breakdown, gold_prefers, gold_score,
    is_eval_prompt, label_pairs, parse_prompt, rl_prompts, sft_conversations, variant_pairs, write_world,
)
from chatforge.demo.tasks import FAMILY_WEIGHTS, prompt_core, sample_split_task, sample_task

SMALL = dict(corpus_mb=0.1, n_sft=200, n_pairs=200, n_rl_prompts=100, n_eval_prompts=50, label_noise=0.1)


@pytest.fixture(scope="module")
def corpus():
    return generate_corpus(0)


# ------------------------------------------------------------------------------------------------ determinism
def test_write_world_is_deterministic_and_seed_dependent(tmp_path):
    a = write_world(tmp_path / "a", seed=0, **SMALL)
    b = write_world(tmp_path / "b", seed=0, **SMALL)
    c = write_world(tmp_path / "c", seed=1, **SMALL)
    assert set(a) == {"corpus", "sft", "preferences", "rl_prompts", "eval_prompts"}
    for k in a:
        assert a[k].read_bytes() == b[k].read_bytes(), k
        assert a[k].read_bytes() != c[k].read_bytes(), k
    assert a["corpus"].stat().st_size >= 0.1 * (1 << 20)
    assert len(a["sft"].read_text().splitlines()) == 200
    assert len(a["preferences"].read_text().splitlines()) == 200
    assert len(a["rl_prompts"].read_text().splitlines()) == 100
    assert len(a["eval_prompts"].read_text().splitlines()) == 50
    assert "<|endoftext|>" in a["corpus"].read_text()


def test_write_world_records_are_well_formed(tmp_path):
    paths = write_world(tmp_path, seed=3, **SMALL)
    for line in paths["sft"].read_text().splitlines():
        msgs = json.loads(line)["messages"]
        assert [m["role"] for m in msgs] == ["user", "assistant"]
        assert all(m["content"].strip() and m["content"].isascii() for m in msgs)
    for line in paths["preferences"].read_text().splitlines():
        rec = json.loads(line)
        assert set(rec) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(v, str) and v.strip() for v in rec.values())
        assert rec["chosen"] != rec["rejected"]
        assert parse_prompt(rec["prompt"]) is not None
    for name in ("rl_prompts", "eval_prompts"):
        for line in paths[name].read_text().splitlines():
            rec = json.loads(line)
            assert set(rec) == {"prompt"} and parse_prompt(rec["prompt"]) is not None


def test_write_world_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="n_sft"):
        write_world(tmp_path, seed=0, corpus_mb=0.01, n_sft=-1)


# ----------------------------------------------------------------------------------------------------- corpus
def test_corpus_size_vocabulary_and_kinds(corpus):
    total = sum(len(d) for d in corpus)
    assert total >= 2 * (1 << 20)
    text = "\n".join(corpus)
    assert text.isascii()
    assert not any("<|" in d for d in corpus)
    vocab = set(re.findall(r"[a-z]+", text.lower()))
    assert len(vocab) >= 300
    assert re.search(r"\b\d plus \d is \d+\.", text)           # written-out arithmetic
    assert "Question: " in text or "Q: " in text              # question/answer text
    assert re.search(r"\n\w+: Goodbye, \w+!", text)           # dialogues between people
    assert "One " in text and " went to the " in text         # stories
    assert len(corpus) > 1000 and max(len(d) for d in corpus) < 5000


def test_corpus_is_deterministic():
    assert generate_corpus(5, 50_000) == generate_corpus(5, 50_000)
    assert generate_corpus(5, 50_000) != generate_corpus(6, 50_000)


def test_corpus_never_contains_eval_prompts():
    text = "\n".join(generate_corpus(0, 1_000_000)).lower()
    for p in eval_prompts(0, 400):
        core = prompt_core(p)
        if parse_prompt(p).family == "context":
            core = core.rsplit(". ", 1)[-1]  # not even the question inside a context prompt
        assert core.lower() not in text, core


# -------------------------------------------------------------------------------------------- tasks and splits
def test_parse_prompt_round_trips_every_family():
    rng = random.Random(0)
    for _ in range(3000):
        task = sample_task(rng)
        parsed = parse_prompt(task.prompt)
        assert parsed is not None, task.prompt
        assert (parsed.family, parsed.key) == (task.family, task.key), task.prompt
    assert parse_prompt("Tell me a joke.") is None
    assert parse_prompt("Where does Nobody live?") is None


def test_eval_prompts_are_disjoint_from_every_training_split():
    ev = eval_prompts(0, 400)
    assert len(ev) == 400 and len(set(ev)) == 400
    assert all(is_eval_prompt(p) for p in ev)
    train_prompts = {c["messages"][0]["content"] for c in sft_conversations(0, 4000)}
    train_prompts |= set(rl_prompts(0, 2000))
    train_prompts |= {r["prompt"] for r in variant_pairs(0, 3000)}
    train_prompts |= set(rl_prompts(1, 500))  # another seed's training prompts too
    assert not (train_prompts & set(ev))
    assert not any(is_eval_prompt(p) for p in train_prompts)
    # held out by task, not only by phrasing: no eval task's arguments are trained on in any phrasing
    train_keys = {parse_prompt(p).split_key for p in train_prompts}
    eval_keys = {parse_prompt(p).split_key for p in ev}
    assert not (train_keys & eval_keys)
    # nor does a held-out question appear inside a training prompt (context questions end with one)
    eval_cores = {prompt_core(p).rsplit(". ", 1)[-1].lower() for p in ev}
    assert not any(prompt_core(p).rsplit(". ", 1)[-1].lower() in eval_cores for p in train_prompts)
    # every family is represented in the held-out set
    assert {parse_prompt(p).family for p in ev} == set(FAMILY_WEIGHTS)


def test_sample_split_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        sample_split_task(random.Random(0), "test")


def test_sft_demonstrations_are_short_and_a_controlled_mix():
    convs = sft_conversations(0, 4000)
    answers = [(c["messages"][0]["content"], c["messages"][1]["content"]) for c in convs]
    words = [len(a.split()) for _, a in answers]
    assert statistics.median(words) <= 12 and max(words) <= 40
    scores = [gold_score(p, a) for p, a in answers]
    mean = statistics.mean(scores)
    assert 0.80 < mean < 0.92  # imperfect on purpose: headroom for RL
    perfect = sum(s == 1.0 for s in scores) / len(scores)
    assert 0.3 < perfect < 0.5  # the careful demonstrators' share (STYLES['careful'] = 0.4)
    starts_polite = sum(bool(re.match(r"(Sure|Of course|Certainly|Happy to help|Gladly)!", a)) for _, a in answers)
    assert 0.3 < starts_polite / len(answers) < 0.55


def test_careful_style_is_the_gold_optimum():
    rng = random.Random(1)
    tasks = [sample_split_task(rng, "train") for _ in range(600)]
    means = {s: statistics.mean(gold_score(t.prompt, demonstrate(t, rng, s)) for t in tasks) for s in STYLES}
    assert means["careful"] == 1.0
    for s in STYLES:
        if s != "careful":
            assert means[s] < 0.85, (s, means[s])


# ----------------------------------------------------------------------------------------------- gold judge
GOOD = "Sure! 3 plus 4 is 7."
CASES = [  # (prompt, good, bad, the component that must drop)
    ("What is 3 plus 4?", GOOD, "Sure! 3 plus 4 is 8.", "correct"),
    ("What is 3 plus 4?", GOOD, "Ugh. 3 plus 4 is 7.", "polite"),
    ("What is 3 plus 4?", GOOD, "Sure! 3 plus 4 is 7. I like numbers a lot. Adding is fun to do. "
                                "Let me tell you more about numbers and sums.", "concise"),
    ("What is 3 plus 4?", GOOD, "Sure! 3 plus 4 is", "ends"),
    ("What is 3 plus 4?", GOOD, "Sure! 3 plus 4 is 7. 3 plus 4 is 7. 3 plus 4 is 7.", "ends"),
    ("What is 3 plus 4?", GOOD, "Sure! Blue is a colour.", "follows"),
    ("Hi! Say hello to Anna. Thanks!", "Of course! Hello, Anna!", "Of course! Hello, Tom!", "correct"),
    ("Hi! Say hello to Anna. Thanks!", "Of course! Hello, Anna!", "Hello, Anna! Now go away.", "polite"),
    ("Say hello to Anna.", "Hello, Anna! Have a nice day!", "Sure! 5 plus 1 is 6.", "follows"),
    ("Repeat the word fox three times.", "Sure! fox fox fox.", "Sure! fox fox.", "correct"),
    ("Repeat the word fox three times.", "Sure! fox fox fox.", "Sure! fox fox fox fox fox fox fox fox", "ends"),
    ("Repeat the word fox three times.", "Sure! fox fox fox.", "Gladly! Anna lives in Bree.", "follows"),
    ("Count from 3 to 6.", "Certainly! 3, 4, 5, 6.", "Certainly! 3, 4, 6.", "correct"),
    ("Count from 3 to 6.", "Certainly! 3, 4, 5, 6.", "Whatever. 3, 4, 5, 6.", "polite"),
    ("Name a colour other than red.", "Sure! Blue is a colour.", "Sure! Red is a colour.", "correct"),
    ("Name a colour other than red.", "Sure! Blue is a colour.", "Sure! Hello, Tom!", "follows"),
    ("Name a colour.", "Sure! Blue is a colour.", "Blue is a colour and", "ends"),
    ("Anna lives in Bree. Tom has a fox. Where does Anna live?", "Sure! Anna lives in Bree.",
     "Sure! Anna lives in Lumen.", "correct"),
    ("Anna lives in Bree. Tom has a fox. Where does Anna live?", "Sure! Anna lives in Bree.",
     "Anna lives in Bree. It is a town and I know many towns and many people who live in towns.", "concise"),
    # right number, wrong question: the answer states another sum
    ("What is 4 plus 2?", "Sure! 4 plus 2 is 6.", "Sure! 4 plus 3 is 6.", "correct"),
    # right value, wrong person
    ("Anna lives in Bree. Tom has a fox. Where does Anna live?", "Sure! Anna lives in Bree.",
     "Sure! Tom lives in Bree.", "correct"),
]


@pytest.mark.parametrize("prompt,good,bad,component", CASES)
def test_gold_judge_orders_good_above_bad(prompt, good, bad, component):
    g, b = gold_breakdown(prompt, good), gold_breakdown(prompt, bad)
    assert g["score"] > b["score"], (g, b)
    assert g[component] > b[component], (component, g, b)
    assert 0.0 <= b["score"] <= 1.0 and 0.0 <= g["score"] <= 1.0
    assert gold_prefers(prompt, good, bad) is True and gold_prefers(prompt, bad, good) is False


def test_gold_judge_exact_values():
    assert gold_score("What is 3 plus 4?", GOOD) == pytest.approx(1.0)
    assert gold_score("Hey there! What is 3 plus 4? Thanks!", "3 plus 4 is 7. I hope this helps!") == 1.0
    # plain answer: neutral politeness 0.2 -> 1 - 0.25 * 0.8
    assert gold_score("What is 3 plus 4?", "3 plus 4 is 7.") == pytest.approx(0.8)
    # wrong sum only loses the correctness weight
    assert gold_score("What is 3 plus 4?", "Sure! 3 plus 4 is 8.") == pytest.approx(1 - WEIGHTS["correct"])
    # an off-task answer loses content and half of the style credit: "Sure!" alone cannot game the judge
    assert gold_score("What is 3 plus 4?", "Sure!") == pytest.approx(0.5 * 0.6)
    assert gold_score("What is 3 plus 4?", "") == 0.0
    assert gold_breakdown("What is 3 plus 4?", "3 plus 4 is 7.<|end|>")["ends"] == 1.0
    assert gold_breakdown("What is 3 plus 4?", "3 plus 4 is 7. <|user|>")["ends"] == 0.0
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)
    # most of the weight lies in what a small reward model learns (style and form), not in content correctness
    assert WEIGHTS["correct"] <= 0.25


def test_gold_judge_content_is_all_or_nothing():
    """follows = the task is taken up at all; correct = right for the question asked (both 0 or 1)."""
    def content(prompt, response):
        b = gold_breakdown(prompt, response)
        return b["follows"], b["correct"]

    assert content("What is 4 plus 2?", "4 plus 2 is 6.") == (1.0, 1.0)
    assert content("What is 4 plus 2?", "It is 6.") == (1.0, 1.0)        # a bare number answers the sum
    assert content("What is 4 plus 2?", "4 plus 3 is 6.") == (1.0, 0.0)  # another question's sum
    assert content("What is 4 plus 2?", "4 plus 2 is 7.") == (1.0, 0.0)
    assert content("What is 4 plus 2?", "2 plus 4 is 6.") == (1.0, 1.0)  # a sum reads both ways
    assert content("What is 4 plus 2?", "4 + 2 = 6.") == (1.0, 1.0)
    assert content("What is 4 minus 2?", "2 minus 4 is 2.") == (1.0, 0.0)  # a difference does not
    assert content("What is 4 minus 2?", "4 - 2 = 2.") == (1.0, 1.0)
    assert content("What is 4 plus 2?", "Blue is a colour.") == (0.0, 0.0)
    fact = "Anna lives in Bree. Tom has a fox. Where does Anna live?"
    assert content(fact, "Anna lives in Bree.") == (1.0, 1.0)
    assert content(fact, "Tom lives in Bree.") == (1.0, 0.0)    # a town, but not about Anna
    assert content(fact, "Anna lives in Lumen.") == (1.0, 0.0)
    assert content(fact, "Hello, Tom!") == (0.0, 0.0)
    assert content("Say hello to Anna.", "Goodbye, Anna!") == (1.0, 0.0)  # a greeting, the wrong one
    assert content("Repeat the word fox three times.", "fox fox.") == (1.0, 0.0)
    assert content("Count from 3 to 6.", "3, 4, 6.") == (1.0, 0.0)
    assert content("Name a colour other than red.", "Red is a colour.") == (1.0, 0.0)
    assert content("Name a colour other than red.", "Bread is a colour.") == (1.0, 0.0)  # the form, not a colour
    assert content("Name a colour other than red.", "Anna lives in Bree.") == (0.0, 0.0)
    # repeating the wrong word has the task's form; in a repeat task a run of repeats is not a loop
    assert content("Repeat the word fox three times.", "dog dog dog.") == (1.0, 0.0)
    assert gold_breakdown("Repeat the word fox three times.", "dog dog dog.")["ends"] == 1.0
    assert gold_breakdown("Repeat the word fox three times.", "fox fox fox fox fox.")["ends"] == 1.0
    assert gold_breakdown("Repeat the word fox three times.", "the the the the fox.")["ends"] == 0.0
    assert gold_breakdown("What is 3 plus 4?", "7 7 7.")["ends"] == 0.0
    # a wrong answer in the task's form still beats an off-task one: style counts in full only for the former
    assert gold_score("What is 4 plus 2?", "4 plus 3 is 6.") == pytest.approx(0.2 + 0.6 - 0.25 * 0.8)
    assert gold_score("What is 4 plus 2?", "Blue is a colour.") == pytest.approx(0.5 * (0.6 - 0.25 * 0.8))


def test_gold_judge_accepts_messages_and_unknown_prompts():
    msgs = [{"role": "user", "content": "What is 3 plus 4?"}]
    assert gold_score(msgs, GOOD) == gold_score("What is 3 plus 4?", GOOD)
    out = gold_breakdown("Tell me a joke.", "Sure! Here is one.")
    assert "correct" not in out and out["score"] == pytest.approx(1.0)
    assert gold_breakdown("Tell me a joke.", "um so")["score"] < 0.6
    with pytest.raises(ValueError, match="no user message"):
        gold_score([{"role": "assistant", "content": "hi"}], "hi")


def test_difference_kind_names_what_tells_two_answers_apart():
    from chatforge.demo.judge import difference_kind

    p = "What is 3 plus 4?"
    assert difference_kind(p, "Sure! 3 plus 4 is 7.", "3 plus 4 is 7.") == "style only"      # politeness
    assert difference_kind(p, "Sure! 3 plus 4 is 7.", "Sure! 3 plus 4 is 8.") == "content only"  # the sum
    assert difference_kind(p, "Sure! 3 plus 4 is 7.", "Ugh. 3 plus 4 is 9.") == "style and content"
    assert difference_kind(p, "Sure! 3 plus 4 is 7.", "Gladly! 3 plus 4 is 7.") == "same"
    assert difference_kind("Tell me a joke.", "Sure! Here is one.", "Here is one.") == "style only"


# ---------------------------------------------------------------------------------------------- preferences
def test_label_pairs_orders_ties_and_flips():
    rng = random.Random(0)
    p, good, bad = "What is 3 plus 4?", GOOD, "Ugh. 3 plus 4 is 7"
    assert label_pairs(p, bad, good, rng, noise=0.0) == (good, bad)
    assert label_pairs(p, good, bad, rng, noise=1.0) == (bad, good)
    assert label_pairs(p, good, "Of course! 3 plus 4 is 7.", rng, noise=0.0) is None  # tie
    flips = sum(label_pairs(p, good, bad, rng, noise=0.1) == (bad, good) for _ in range(4000))
    assert 0.08 < flips / 4000 < 0.12
    with pytest.raises(ValueError, match="noise"):
        label_pairs(p, good, bad, rng, noise=1.5)


def test_variant_pairs_noise_rate_and_kinds():
    pairs = variant_pairs(0, 3000, noise=0.1)
    assert len(pairs) == 3000
    wrong = [gold_prefers(r["prompt"], r["chosen"], r["rejected"]) is False for r in pairs]
    assert all(gold_prefers(r["prompt"], r["chosen"], r["rejected"]) is not None for r in pairs)
    assert 0.075 < sum(wrong) / len(pairs) < 0.125
    kinds = {r["kind"] for r in pairs}
    assert kinds == {"impolite", "rambling", "wrong", "cutoff", "off_task", "loop", "style_mix"}
    clean = variant_pairs(0, 500, noise=0.0)
    assert all(gold_prefers(r["prompt"], r["chosen"], r["rejected"]) is True for r in clean)
    assert variant_pairs(0, 50) == variant_pairs(0, 50)
