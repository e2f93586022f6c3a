"""Task families of the demo world: prompts, the held-out split, and a parser that recovers the task from prompt text.

Families (each prompt is one of a few phrasings, with an optional greeting prefix and thanks suffix):

    add      "What is 3 plus 4?"                      -> "3 plus 4 is 7."
    sub      "What is 7 minus 2?"                     -> "7 minus 2 is 5."
    fact     "Where does Anna live?"                  -> "Anna lives in Bree."        (world knowledge)
    context  "Tom has a fox. Where does Anna live?"   -> answer read from the prompt's own statements
    greet    "Say hello to Anna."                     -> "Hello, Anna!"
    repeat   "Repeat the word fox three times."       -> "fox fox fox."
    count    "Count from 3 to 6."                     -> "3, 4, 5, 6."
    name     "Name a colour other than red."          -> "Blue is a colour."

Held-out split: every task has a key (family + arguments, phrasing excluded); a hash of the key puts ~15% of
tasks in the evaluation bucket (a context question is bucketed with the plain question it contains).
Training prompts (SFT, preferences, RL, the corpus's Q/A text) come only from the other bucket, so no
evaluation prompt -- nor any rephrasing of it -- is ever trained on.

The answers (demonstrators, wrong and off-task variants) are in demonstrators.py.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from chatforge.demo.world import (
    CATEGORIES, NAMES, RELATIONS, REPEAT_WORDS, a_an, get_world,
)

EVAL_FRACTION = 0.15
"""Share of task keys held out for evaluation."""

FAMILY_WEIGHTS = {
    "add": 0.16, "sub": 0.08, "fact": 0.08, "context": 0.16,
    "greet": 0.13, "repeat": 0.13, "count": 0.10, "name": 0.16,
}

PREFIXES = ["", "Hi! ", "Hello! ", "Hey there! "]
SUFFIXES = ["", " Thanks!", " Thank you."]

TEMPLATES = {
    "add": ["What is {a} plus {b}?", "How much is {a} plus {b}?", "Add {a} and {b}.",
            "What do you get if you add {a} and {b}?", "Please work out {a} plus {b}."],
    "sub": ["What is {a} minus {b}?", "How much is {a} minus {b}?", "Take {b} away from {a}.",
            "What do you get if you take {b} from {a}?", "Please work out {a} minus {b}."],
    "greet_hello": ["Say hello to {name}.", "Greet {name}.", "Please say hello to {name}."],
    "greet_goodbye": ["Say goodbye to {name}.", "Wave goodbye to {name}.", "Please say goodbye to {name}."],
    "repeat": ["Repeat the word {word} {n} times.", "Say the word {word} {n} times.",
               "Write the word {word} {n} times."],
    "count": ["Count from {a} to {b}.", "Count up from {a} to {b}.", "List the numbers from {a} to {b}."],
    "name": ["Name {art} {cat}.", "Tell me one {cat}.", "Can you name {art} {cat}?"],
    "name_x": ["Name {art} {cat} other than {x}.", "Tell me one {cat} that is not {x}.",
               "Can you name {art} {cat} other than {x}?"],
}
QUESTIONS = {
    "town": ["Where does {name} live?", "In which town does {name} live?", "What town is {name} from?"],
    "job": ["What does {name} do for work?", "What is the job of {name}?", "What job does {name} have?"],
    "pet": ["What pet does {name} have?", "Which animal does {name} keep?", "What animal does {name} own?"],
    "colour": ["What colour does {name} like?", "What is the favourite colour of {name}?",
               "Which colour does {name} love?"],
    "food": ["What food does {name} like to eat?", "What does {name} like to eat?",
             "Which food does {name} enjoy?"],
}
STATEMENTS = {
    "town": "{name} lives in {value}.",
    "job": "{name} is {art} {value}.",
    "pet": "{name} has {art} {value}.",
    "colour": "{name} likes the colour {value}.",
    "food": "{name} likes to eat {value}.",
}
N_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class Task:
    """One task instance. `key` holds the arguments that define the answer (not the phrasing)."""

    family: str
    key: tuple
    prompt: str

    @property
    def key_str(self) -> str:
        return "|".join([self.family, *map(str, self.key)]).lower()

    @property
    def split_key(self) -> str:
        """The key that decides the train/eval bucket. A context question shares it with the plain question
        about the same (name, relation), so a held-out question never appears inside a training prompt."""
        if self.family == "context":
            return "|".join(["fact", *map(str, self.key[:2])]).lower()
        return self.key_str


# ----------------------------------------------------------------------------------------------- held-out split
def is_eval_key(key_str: str) -> bool:
    """True when a task's split key falls in the held-out evaluation bucket (stable across runs and machines)."""
    h = int(hashlib.md5(key_str.encode("ascii")).hexdigest()[:8], 16)
    return (h % 1000) < int(EVAL_FRACTION * 1000)


def is_eval_prompt(prompt: str) -> bool:
    """True when the prompt's task is held out for evaluation; ValueError if the prompt is not a demo task."""
    task = parse_prompt(prompt)
    if task is None:
        raise ValueError(f"not a demo-world prompt: {prompt!r}")
    return is_eval_key(task.split_key)


# ----------------------------------------------------------------------------------------------------- sampling
def _decorate(rng: random.Random, core: str) -> str:
    return rng.choice(PREFIXES) + core + rng.choice(SUFFIXES)


def _fill(template: str, **kw) -> str:
    return template.format(**kw)


def sample_task(rng: random.Random, family: str | None = None) -> Task:
    """Draw one task (any bucket) with a random phrasing."""
    if family is None:
        fams, weights = zip(*FAMILY_WEIGHTS.items())
        family = rng.choices(fams, weights)[0]
    if family == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return Task("add", (a, b), _decorate(rng, _fill(rng.choice(TEMPLATES["add"]), a=a, b=b)))
    if family == "sub":
        a = rng.randint(0, 9)
        b = rng.randint(0, a)
        return Task("sub", (a, b), _decorate(rng, _fill(rng.choice(TEMPLATES["sub"]), a=a, b=b)))
    if family == "fact":
        name, rel = rng.choice(NAMES), rng.choice(RELATIONS)
        return Task("fact", (name, rel), _decorate(rng, _fill(rng.choice(QUESTIONS[rel]), name=name)))
    if family == "context":
        name, rel = rng.choice(NAMES), rng.choice(RELATIONS)
        other, orel = rng.choice([n for n in NAMES if n != name]), rng.choice(RELATIONS)
        stmts = [statement(name, rel), statement(other, orel)]
        if rng.random() < 0.5:
            stmts.reverse()
        core = " ".join(stmts) + " " + _fill(rng.choice(QUESTIONS[rel]), name=name)
        return Task("context", (name, rel, other, orel), _decorate(rng, core))
    if family == "greet":
        kind, name = rng.choice(["hello", "goodbye"]), rng.choice(NAMES)
        core = _fill(rng.choice(TEMPLATES["greet_" + kind]), name=name)
        return Task("greet", (kind, name), _decorate(rng, core))
    if family == "repeat":
        word, n = rng.choice(REPEAT_WORDS), rng.choice([2, 3, 4])
        core = _fill(rng.choice(TEMPLATES["repeat"]), word=word, n=N_WORDS[n])
        return Task("repeat", (word, n), _decorate(rng, core))
    if family == "count":
        a = rng.randint(0, 12)
        b = a + rng.randint(2, 5)
        return Task("count", (a, b), _decorate(rng, _fill(rng.choice(TEMPLATES["count"]), a=a, b=b)))
    if family == "name":
        cat = rng.choice(list(CATEGORIES))
        if rng.random() < 0.5:
            core = _fill(rng.choice(TEMPLATES["name"]), art=a_an(cat), cat=cat)
            return Task("name", (cat, ""), _decorate(rng, core))
        x = rng.choice(CATEGORIES[cat])
        core = _fill(rng.choice(TEMPLATES["name_x"]), art=a_an(cat), cat=cat, x=x)
        return Task("name", (cat, x), _decorate(rng, core))
    raise ValueError(f"unknown task family {family!r}; expected one of {sorted(FAMILY_WEIGHTS)}")


def sample_split_task(rng: random.Random, split: str) -> Task:
    """Draw a task from the 'train' or 'eval' bucket (family by FAMILY_WEIGHTS, then arguments by rejection)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    want_eval = split == "eval"
    fams, weights = zip(*FAMILY_WEIGHTS.items())
    family = rng.choices(fams, weights)[0]  # pick the family first, so both splits keep FAMILY_WEIGHTS' mix
    while True:
        task = sample_task(rng, family)
        if is_eval_key(task.split_key) == want_eval:
            return task


def sample_prompts(rng: random.Random, n: int, split: str, distinct: bool = True) -> list[Task]:
    """`n` tasks of one split; distinct prompts where the space allows (falls back to repeats if not)."""
    tasks, seen, tries = [], set(), 0
    while len(tasks) < n:
        task = sample_split_task(rng, split)
        tries += 1
        if distinct and task.prompt in seen and tries < 50 * n:
            continue
        seen.add(task.prompt)
        tasks.append(task)
    return tasks


# ------------------------------------------------------------------------------------------------------ parsing
_FIELDS = {
    "a": r"\d+", "b": r"\d+", "name": r"[A-Za-z]+", "word": r"[A-Za-z]+", "n": r"two|three|four",
    "cat": "|".join(CATEGORIES), "x": r"[A-Za-z]+", "art": r"an?", "value": r"[A-Za-z]+",
}


def _compile(template: str) -> re.Pattern:
    """Template with {field}s -> a full-match, case-insensitive regex with named groups."""
    out, seen, pos = [], set(), 0
    for m in re.finditer(r"\{(\w+)\}", template):
        out.append(re.escape(template[pos:m.start()]))
        f = m.group(1)
        out.append(f"(?P={f})" if f in seen else f"(?P<{f}>{_FIELDS[f]})")
        seen.add(f)
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out), re.IGNORECASE)


_PATTERNS = {k: [_compile(t) for t in v] for k, v in TEMPLATES.items()}
_QPATTERNS = {rel: [_compile(t) for t in v] for rel, v in QUESTIONS.items()}
_SPATTERNS = {rel: _compile(t) for rel, t in STATEMENTS.items()}
_NAME_CANON = {n.lower(): n for n in NAMES}
_WORD_TO_N = {v: k for k, v in N_WORDS.items()}


def prompt_core(text: str) -> str:
    """The prompt without its greeting prefix and thanks suffix."""
    text = " ".join(text.strip().split())
    for s in sorted(SUFFIXES, key=len, reverse=True):
        if s and text.lower().endswith(s.strip().lower()) and len(text) > len(s):
            text = text[: -len(s.strip())].rstrip()
            break
    for p in sorted(PREFIXES, key=len, reverse=True):
        if p and text.lower().startswith(p.strip().lower()) and len(text) > len(p):
            text = text[len(p.strip()):].lstrip()
            break
    return text


def _match(patterns, text):
    for p in patterns:
        m = p.fullmatch(text)
        if m:
            return m
    return None


def parse_prompt(prompt: str) -> Task | None:
    """Recover the task (family, key) from prompt text; None if the text is not a demo-world prompt."""
    core = prompt_core(prompt)
    for fam in ("add", "sub", "count"):
        m = _match(_PATTERNS[fam], core)
        if m:
            return Task(fam, (int(m["a"]), int(m["b"])), prompt)
    for kind in ("hello", "goodbye"):
        m = _match(_PATTERNS["greet_" + kind], core)
        if m and m["name"].lower() in _NAME_CANON:
            return Task("greet", (kind, _NAME_CANON[m["name"].lower()]), prompt)
    m = _match(_PATTERNS["repeat"], core)
    if m:
        return Task("repeat", (m["word"].lower(), _WORD_TO_N[m["n"].lower()]), prompt)
    m = _match(_PATTERNS["name_x"], core) or _match(_PATTERNS["name"], core)
    if m:
        cat = m["cat"].lower()
        x = m.groupdict().get("x") or ""
        canon = {w.lower(): w for w in CATEGORIES[cat]}
        return Task("name", (cat, canon.get(x.lower(), x)), prompt)
    # fact / context: the last sentence is the question, any earlier sentences are context statements
    sentences = re.split(r"(?<=[.?!])\s+", core)
    question, context = sentences[-1], sentences[:-1]
    for rel, pats in _QPATTERNS.items():
        m = _match(pats, question)
        if not m or m["name"].lower() not in _NAME_CANON:
            continue
        name = _NAME_CANON[m["name"].lower()]
        if not context:
            return Task("fact", (name, rel), prompt)
        facts = [_parse_statement(s) for s in context]
        if any(f is None for f in facts):
            return None
        others = [f for f in facts if (f[0], f[1]) != (name, rel)]
        other, orel = (others[0][0], others[0][1]) if others else (name, rel)
        return Task("context", (name, rel, other, orel), prompt)
    return None


def _parse_statement(sentence: str) -> tuple[str, str, str] | None:
    """'Anna lives in Bree.' -> ('Anna', 'town', 'Bree'); None if not a statement."""
    for rel, pat in _SPATTERNS.items():
        m = pat.fullmatch(sentence)
        if m and m["name"].lower() in _NAME_CANON:
            return _NAME_CANON[m["name"].lower()], rel, m["value"]
    return None


def context_facts(prompt: str) -> dict[tuple[str, str], str]:
    """The (name, relation) -> value statements a prompt itself states (its context)."""
    core = prompt_core(prompt)
    out = {}
    for s in re.split(r"(?<=[.?!])\s+", core)[:-1]:
        f = _parse_statement(s)
        if f:
            out[(f[0], f[1])] = f[2]
    return out


# -------------------------------------------------------------------------------------------------- statements
def statement(name: str, relation: str, value: str | None = None) -> str:
    """The world's sentence for one fact, e.g. 'Anna lives in Bree.'."""
    if value is None:
        value = get_world().person(name).fact(relation)
    return STATEMENTS[relation].format(name=name, art=a_an(value), value=value)


# ------------------------------------------------------------------------------------------------------- splits
def rl_prompts(seed: int, n: int) -> list[str]:
    """`n` RL prompts from the training bucket (distinct where possible)."""
    rng = random.Random(f"chatforge-rl-{seed}")
    return [t.prompt for t in sample_prompts(rng, n, "train")]


def eval_prompts(seed: int, n: int) -> list[str]:
    """`n` distinct held-out prompts (evaluation bucket only: disjoint from every training split)."""
    rng = random.Random(f"chatforge-eval-{seed}")
    return [t.prompt for t in sample_prompts(rng, n, "eval")]
