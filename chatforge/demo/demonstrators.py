"""The demo world's demonstrators: the answers to its tasks, in the styles of "many demonstrators".

SFT answers come from a controlled mix of styles (see STYLES): most are careful (a courteous opener, a short
correct sentence), others plain, rambling, rude, sloppy at the end, or mistaken. The SFT model therefore samples a
mixture, and the reward model + RL have a preferred style to find. wrong_body / off_task_body make the degraded
answers of the controlled preference pairs (preferences.py).
"""

from __future__ import annotations

import random

from chatforge.demo.tasks import FAMILY_WEIGHTS, Task, context_facts, sample_prompts, sample_task, statement
from chatforge.demo.world import CATEGORIES, NAMES, RELATION_CATEGORY, a_an, get_world

# Demonstrator phrases. The judge (judge.py) recognises exactly these families of phrases.
POLITE_OPENERS = ["Sure!", "Of course!", "Certainly!", "Happy to help!", "Gladly!"]
POLITE_CLOSINGS = ["I hope this helps!", "Have a nice day!", "Thanks for asking!", "Glad to help!"]
RUDE_OPENERS = ["Ugh.", "Whatever.", "Fine, I guess.", "Obviously.", "Do I have to?", "Boring question."]
RUDE_CLOSINGS = ["Now go away.", "Stop asking me.", "That was boring.", "Figure it out yourself next time."]
FILLERS = [
    "I like this sort of question.", "It is a nice thing to think about.", "Many people ask me things like this.",
    "Let me say a little more about it.", "There is always more to learn.", "I could talk about this all day.",
    "It is good to be curious.", "This was fun to think about.", "Questions like this make me smile.",
    "I always try to do my best.",
]
SLOPPY_TAILS = ["", " and", " and then", " so", " um"]

STYLES = {"careful": 0.40, "plain": 0.20, "rambling": 0.15, "rude": 0.10, "sloppy": 0.10, "mistaken": 0.05}
"""The SFT demonstrators' style mix (probabilities). 'careful' is the style the gold judge scores 1.0."""


def expected_value(task: Task) -> str:
    """For fact/context tasks: the right value (the prompt's own statement wins over world knowledge)."""
    name, rel = task.key[0], task.key[1]
    return context_facts(task.prompt).get((name, rel)) or get_world().person(name).fact(rel)


def answer_body(task: Task) -> str:
    """The correct, minimal answer sentence of a task."""
    f, k = task.family, task.key
    if f == "add":
        return f"{k[0]} plus {k[1]} is {k[0] + k[1]}."
    if f == "sub":
        return f"{k[0]} minus {k[1]} is {k[0] - k[1]}."
    if f in ("fact", "context"):
        return statement(k[0], k[1], expected_value(task))
    if f == "greet":
        return f"{k[0].capitalize()}, {k[1]}!"
    if f == "repeat":
        return " ".join([k[0]] * k[1]) + "."
    if f == "count":
        return ", ".join(str(i) for i in range(k[0], k[1] + 1)) + "."
    if f == "name":
        cat, x = k
        choice = next(w for w in CATEGORIES[cat] if w != x)
        return _name_sentence(choice, cat)
    raise ValueError(f"unknown task family {f!r}")


def _name_sentence(word: str, cat: str) -> str:
    return f"{word[0].upper() + word[1:]} is {a_an(cat)} {cat}."


def answer_body_random(task: Task, rng: random.Random) -> str:
    """A correct answer; for open tasks ('name a colour') a random valid choice."""
    if task.family == "name":
        cat, x = task.key
        return _name_sentence(rng.choice([w for w in CATEGORIES[cat] if w != x]), cat)
    return answer_body(task)


def wrong_body(task: Task, rng: random.Random) -> str:
    """A well-formed answer with wrong content (wrong sum, wrong fact, wrong count, ...)."""
    f, k = task.family, task.key
    if f in ("add", "sub"):
        c = k[0] + k[1] if f == "add" else k[0] - k[1]
        w = rng.choice([d for d in (c - 2, c - 1, c + 1, c + 2) if d >= 0])
        return f"{k[0]} {'plus' if f == 'add' else 'minus'} {k[1]} is {w}."
    if f in ("fact", "context"):
        right = expected_value(task)
        cat = CATEGORIES[RELATION_CATEGORY[k[1]]]
        return statement(k[0], k[1], rng.choice([v for v in cat if v != right]))
    if f == "greet":
        if rng.random() < 0.5:
            other = "goodbye" if k[0] == "hello" else "hello"
            return f"{other.capitalize()}, {k[1]}!"
        return f"{k[0].capitalize()}, {rng.choice([n for n in NAMES if n != k[1]])}!"
    if f == "repeat":
        n = rng.choice([m for m in (k[1] - 1, k[1] + 1) if m >= 1])
        return " ".join([k[0]] * n) + "."
    if f == "count":
        nums = list(range(k[0], k[1] + 1))
        if rng.random() < 0.5:
            nums.pop(rng.randrange(1, len(nums) - 1))
        else:
            nums.append(k[1] + 1)
        return ", ".join(map(str, nums)) + "."
    if f == "name":
        cat, x = k
        if x:
            return _name_sentence(x, cat)
        other = rng.choice([c for c in CATEGORIES if c != cat])
        return _name_sentence(rng.choice(CATEGORIES[other]), cat)
    raise ValueError(f"unknown task family {f!r}")


def off_task_body(task: Task, rng: random.Random) -> str:
    """A correct answer to a different task family: does not follow the instruction."""
    fam = rng.choice([f for f in FAMILY_WEIGHTS if f != task.family and {f, task.family} != {"fact", "context"}])
    return answer_body_random(sample_task(rng, fam), rng)


def style_response(body: str, style: str, rng: random.Random) -> str:
    """Dress an answer sentence in one demonstrator style."""
    if style in ("careful", "mistaken"):
        if rng.random() < 0.75:
            return f"{rng.choice(POLITE_OPENERS)} {body}"
        return f"{body} {rng.choice(POLITE_CLOSINGS)}"
    if style == "plain":
        return body
    if style == "rambling":
        opener = rng.choice(POLITE_OPENERS) + " " if rng.random() < 0.5 else ""
        return opener + body + " " + " ".join(rng.sample(FILLERS, rng.randint(2, 3)))
    if style == "rude":
        if rng.random() < 0.7:
            return f"{rng.choice(RUDE_OPENERS)} {body}"
        return f"{body} {rng.choice(RUDE_CLOSINGS)}"
    if style == "sloppy":
        opener = rng.choice(POLITE_OPENERS) + " " if rng.random() < 0.5 else ""
        return opener + body.rstrip(".!?") + rng.choice(SLOPPY_TAILS)
    raise ValueError(f"unknown style {style!r}; expected one of {sorted(STYLES)}")


def demonstrate(task: Task, rng: random.Random, style: str | None = None) -> str:
    """One demonstrator's answer. style=None draws the style from the SFT mix (STYLES)."""
    if style is None:
        names, weights = zip(*STYLES.items())
        style = rng.choices(names, weights)[0]
    body = wrong_body(task, rng) if style == "mistaken" else answer_body_random(task, rng)
    return style_response(body, style, rng)


def sft_conversations(seed: int, n: int) -> list[dict]:
    """`n` single-turn SFT conversations {"messages": [user, assistant]} from the training bucket."""
    rng = random.Random(f"chatforge-sft-{seed}")
    out = []
    for task in sample_prompts(rng, n, "train", distinct=False):
        out.append({"messages": [{"role": "user", "content": task.prompt},
                                 {"role": "assistant", "content": demonstrate(task, rng)}]})
    return out
