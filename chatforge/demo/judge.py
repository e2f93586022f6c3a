"""The gold judge: what the demo world's "labellers" prefer, as a pure function of (prompt, response) text.

Components, each in [0, 1]:

    correct   the answer is right for the question asked: the sum of the asked numbers, the asked person's
              fact, the asked word the asked number of times, ...                            weight 0.20
    follows   the answer has the task's form, right or wrong: a number for a sum, a greeting for a
              greeting, the asked word or a repeated word for 'repeat', numbers for 'count', a thing
              named as the asked kind ('... is a colour'), the asked person or a value of the asked
              kind for a fact                                                                  weight 0.20
    polite    a courteous opener ('Sure!') or closing ('I hope this helps!'): 1; neither: 0.2;
              any rude phrase ('Ugh.', 'Whatever.'): 0                                        weight 0.25
    concise   1 within the task's word budget (the careful answer + 4 words), linear to 0
              ten words beyond it                                                              weight 0.15
    ends      a complete last sentence ending in '.', '!' or '?', no dangling 'and', no
              repeated sentence or word loop (a word three times running; in a repeat task the
              asked word six times, another word more than the asked count), no leaked special token
                                                                                               weight 0.20

    score = 0.20 correct + 0.20 follows + (0.5 + 0.5 follows) * (0.25 polite + 0.15 concise + 0.20 ends)

Style credit is halved when the answer ignores the task, so "Sure!" alone cannot earn most of the score.
Both content components are all-or-nothing, as a labeller reads an answer: "4 plus 3 is 7." is wrong for
"What is 4 plus 2?" (it answers another question; "2 plus 4 is 6." is right), and so is "Tom lives in Bree."
for "Where does Anna live?" even when Anna lives in Bree (an answer to a fact question names the person).
Most of the weight lies in what a tiny reward model learns from a few thousand pairs (courtesy, length, a
clean ending, whether the task is taken up); whether the content is right is a smaller part. A careful demonstrator scores 1.0. Prompts that are not demo tasks are scored on style only
(polite, concise, ends, renormalised).
"""

from __future__ import annotations

import re

from chatforge.demo.demonstrators import (
    POLITE_CLOSINGS, POLITE_OPENERS, RUDE_CLOSINGS, RUDE_OPENERS, answer_body, expected_value,
)
from chatforge.demo.tasks import Task, parse_prompt
from chatforge.demo.world import CATEGORIES, NAMES, RELATION_CATEGORY

WEIGHTS = {"correct": 0.20, "follows": 0.20, "polite": 0.25, "concise": 0.15, "ends": 0.20}
STYLE_KEYS = ("polite", "concise", "ends")
JUDGE_VERSION = 2
"""Bumped whenever a change to the judge changes a score: run directories relabel and re-evaluate."""

NEUTRAL_POLITE = 0.2
RUDE_PATTERN = re.compile(
    r"\b(ugh|whatever|i guess|obviously|do i have to|boring|go away|stop asking|yourself|stupid|shut up|dumb)\b")
DANGLING = {"and", "so", "um", "then", "the", "a", "an", "to", "of", "but", "or", "is", "with"}
SLACK_WORDS = 4      # courtesy allowance over the careful answer's length
RAMP_WORDS = 10      # words over budget at which concise reaches 0
UNKNOWN_BUDGET = 16  # word budget for prompts that are not demo tasks

_WORD = re.compile(r"[a-z]+|\d+")
_NAMES = {n.lower() for n in NAMES}


def _clean(response: str) -> str:
    """Drop a trailing end-of-turn/end-of-text marker that a decoder may leave behind."""
    r = response.strip()
    for tok in ("<|end|>", "<|endoftext|>"):
        if r.endswith(tok):
            r = r[: -len(tok)].rstrip()
    return r


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


# -------------------------------------------------------------------------------------------- style components
def polite_score(response: str) -> float:
    r = _clean(response).lower()
    if RUDE_PATTERN.search(r):
        return 0.0
    if any(r.startswith(o.lower()) for o in POLITE_OPENERS) or any(r.endswith(c.lower()) for c in POLITE_CLOSINGS):
        return 1.0
    return NEUTRAL_POLITE


def concise_score(response: str, budget: int) -> float:
    n = len(_clean(response).split())
    return max(0.0, min(1.0, 1.0 - (n - budget) / RAMP_WORDS))


def ends_score(response: str, task: Task | None) -> float:
    r = _clean(response)
    if not r or "<|" in r or r[-1] not in ".!?":
        return 0.0
    words = _words(r)
    if not words or words[-1] in DANGLING:
        return 0.0
    sentences = [" ".join(_words(s)) for s in re.split(r"[.!?]+", r)]
    sentences = [s for s in sentences if s]
    if len(sentences) != len(set(sentences)):
        return 0.0  # a repeated sentence: a loop
    repeat = task is not None and task.family == "repeat"  # there repeating is the task
    for w, run in _longest_run(words).items():
        limit = (5 if w == task.key[0] else max(2, task.key[1])) if repeat else 2
        if run > limit:
            return 0.0  # a word loop
    return 1.0


def _longest_run(words: list[str]) -> dict[str, int]:
    """Each word -> its longest run of consecutive repeats."""
    out: dict[str, int] = {}
    run = 0
    for i, w in enumerate(words):
        run = run + 1 if i and w == words[i - 1] else 1
        out[w] = max(out.get(w, 0), run)
    return out


# ------------------------------------------------------------------------------------------ content components
_COURTESY = sorted(POLITE_OPENERS + POLITE_CLOSINGS + RUDE_OPENERS + RUDE_CLOSINGS, key=len, reverse=True)


def _strip_courtesy(response: str) -> str:
    """The response without the known opening/closing phrases ('Happy to help!' holds no answer)."""
    r = _clean(response)
    changed = True
    while changed:
        changed = False
        for c in _COURTESY:
            if r.lower().startswith(c.lower()):
                r, changed = r[len(c):].lstrip(), True
            elif r.lower().endswith(c.lower()):
                r, changed = r[: -len(c)].rstrip(), True
    return r


def content_scores(task: Task, response: str) -> tuple[float, float]:
    """(follows, correct) of a response to a parsed task, each 0 or 1 (courtesy phrases are not read as
    content). An answer is correct only if it is about what was asked: the asked numbers, person or word."""
    r = _strip_courtesy(response)
    words = _words(r)
    f, k = task.family, task.key
    if f in ("add", "sub"):
        truth = k[0] + k[1] if f == "add" else k[0] - k[1]
        nums = _numbers(r)
        sign = r"(?:plus|\+)" if f == "add" else r"(?:minus|-)"
        operands = [(k[0], k[1]), (k[1], k[0])] if f == "add" else [(k[0], k[1])]  # a sum reads both ways
        for a, b in operands:
            stated = re.search(rf"\b{a}\s*{sign}\s*{b}\s*(?:is|equals|makes|=)\s*(\d+)", r, re.IGNORECASE)
            if stated:
                return 1.0, float(int(stated.group(1)) == truth)
        if re.search(r"\d+\s*(?:plus|minus|\+|-)\s*\d+", r, re.IGNORECASE):
            return 1.0, 0.0  # the sum or difference of other numbers
        return float(bool(nums)), float(bool(nums) and nums[-1] == truth)
    if f in ("fact", "context"):
        name, rel = k[0], k[1]
        members = {v.lower() for v in CATEGORIES[RELATION_CATEGORY[rel]]}
        found = {w for w in words if w in members}
        has_name = name.lower() in words
        return float(has_name or bool(found)), float(has_name and found == {expected_value(task).lower()})
    if f == "greet":
        kind, name = k
        greet_words = {"hello": {"hello", "hi"}, "goodbye": {"goodbye", "bye"}}
        asked = bool(greet_words[kind] & set(words))
        other = bool(greet_words["goodbye" if kind == "hello" else "hello"] & set(words))
        names = {w for w in words if w in _NAMES}
        return float(asked or other), float(asked and not other and names == {name.lower()})
    if f == "repeat":
        word, n = k
        runs = _longest_run(words)
        count = sum(w == word for w in words)
        return float(count > 0 or max(runs.values(), default=0) >= 2), float(count == n and runs[word] == n)
    if f == "count":
        nums = _numbers(r)
        return float(bool(nums)), float(nums == list(range(k[0], k[1] + 1)))
    if f == "name":
        cat, x = k
        members = {v.lower() for v in CATEGORIES[cat]}
        found = {w for w in words if w in members}
        return float(bool(found) or cat in words), float(len(found) == 1 and x.lower() not in found)
    raise ValueError(f"unknown task family {f!r}")


# ---------------------------------------------------------------------------------------------------- the judge
def _prompt_text(prompt) -> str:
    """Accept a prompt string or a message list (the last user message is the prompt)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("gold judge: the message list has no user message")
    return users[-1]


def gold_breakdown(prompt, response: str) -> dict[str, float]:
    """The judge's components and total: {'correct', 'follows', 'polite', 'concise', 'ends', 'score'}.

    For prompts that are not demo tasks, 'correct' and 'follows' are absent and the score is the renormalised
    style score.
    """
    task = parse_prompt(_prompt_text(prompt))
    if not _clean(response):  # an empty answer earns nothing
        out = {k: 0.0 for k in STYLE_KEYS}
        if task is not None:
            out.update(follows=0.0, correct=0.0)
        return {**out, "score": 0.0}
    if task is None:
        budget = UNKNOWN_BUDGET
    else:
        budget = len(answer_body(task).split()) + SLACK_WORDS
    out = {"polite": polite_score(response), "concise": concise_score(response, budget),
           "ends": ends_score(response, task)}
    style = sum(WEIGHTS[k] * out[k] for k in STYLE_KEYS)
    if task is None:
        out["score"] = style / sum(WEIGHTS[k] for k in STYLE_KEYS)
        return out
    follows, correct = content_scores(task, response)
    out["follows"], out["correct"] = follows, correct
    out["score"] = WEIGHTS["correct"] * correct + WEIGHTS["follows"] * follows + (0.5 + 0.5 * follows) * style
    return out


def difference_kind(prompt, response_a: str, response_b: str) -> str:
    """Which gold components tell two responses apart: 'style only' (polite/concise/ends), 'content only'
    (correct/follows) or 'style and content' ('same' when none do). Used to break reward-model accuracy down by
    what a pair tests: a small reward model learns style far sooner than content."""
    a, b = gold_breakdown(prompt, response_a), gold_breakdown(prompt, response_b)
    differs = {k for k in a if k != "score" and abs(a[k] - b.get(k, 0.0)) > 1e-9}
    style, content = bool(differs & set(STYLE_KEYS)), bool(differs - set(STYLE_KEYS))
    return {(True, False): "style only", (False, True): "content only", (True, True): "style and content",
            (False, False): "same"}[(style, content)]


def gold_score(prompt, response: str) -> float:
    """The gold judge's score in [0, 1] (see the module docstring)."""
    return gold_breakdown(prompt, response)["score"]
