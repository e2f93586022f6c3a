"""The demo world's pretraining corpus: varied, English-like documents generated from templates.

Document kinds (weights in DOC_KINDS): fact sheets about people, town descriptions, short stories, written-out
arithmetic and counting, category lists, question/answer text and dialogues between people. The Q/A text uses
only training-bucket tasks (see tasks.py), so held-out evaluation prompts never appear in the corpus, and it is
mostly answered plainly (the courteous chat style is SFT's job to teach).
"""

from __future__ import annotations

import random

from chatforge.demo.demonstrators import POLITE_OPENERS, answer_body_random
from chatforge.demo.tasks import sample_split_task, statement
from chatforge.demo.world import (
    ADJECTIVES, ANIMALS, CATEGORIES, CATEGORY_PLURAL, COLOURS, DAYS, FEELINGS, FOODS, NAMES, NUMBER_WORDS, OBJECTS,
    PLACES, RELATIONS, REPEAT_WORDS, SEASONS, TOWNS, VERBS, WEATHER, a_an, get_world,
)

DOC_KINDS = {"bio": 0.18, "town": 0.06, "story": 0.26, "arithmetic": 0.14, "category": 0.07, "qa": 0.17,
             "chat": 0.12}
COUNTABLE_FOODS = ["apples", "pears", "plums", "eggs", "nuts", "berries", "grapes", "carrots"]
N_WORD = {2: "two", 3: "three", 4: "four"}


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _bio(rng: random.Random) -> str:
    world = get_world()
    p = rng.choice(world.people)
    sents = [statement(p.name, r, p.fact(r)) for r in RELATIONS]
    extra = [
        f"{p.name} works as {a_an(p.job)} {p.job} in {p.town}.",
        f"The {p.pet} of {p.name} is {rng.choice(ADJECTIVES)}.",
        f"The favourite colour of {p.name} is {p.colour}.",
        f"Every {rng.choice(DAYS)}, {p.name} eats {p.food}.",
        f"{p.town} is {world.town_feature[p.town]}.",
        f"{p.name} is {rng.choice(ADJECTIVES)} and {rng.choice(ADJECTIVES)}.",
        f"In {rng.choice(SEASONS)}, {p.name} likes to walk to the {rng.choice(PLACES)}.",
        f"{p.name} has {a_an(p.colour)} {p.colour} {rng.choice(OBJECTS)}.",
    ]
    sents += rng.sample(extra, rng.randint(2, 5))
    rng.shuffle(sents)
    return f"About {p.name}.\n" + " ".join(sents)


def _town(rng: random.Random) -> str:
    world = get_world()
    t = rng.choice(TOWNS)
    people = world.residents(t)
    adj = rng.choice(ADJECTIVES)
    sents = [f"{t} is {a_an(adj)} {adj} town {world.town_feature[t]}."]
    if people:
        names = [p.name for p in people]
        who = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
        sents.append(f"{who} {'live' if len(names) > 1 else 'lives'} in {t}.")
        for p in rng.sample(people, min(2, len(people))):
            sents.append(f"{p.name} is the {p.job} of {t}.")
    p1, p2 = rng.sample(PLACES, 2)
    sents.append(f"In {t} there is {a_an(p1)} {p1} and {a_an(p2)} {p2}.")
    sents.append(f"The weather in {t} is often {rng.choice(WEATHER)}.")
    return " ".join(sents)


def _story(rng: random.Random) -> str:
    world = get_world()
    hero, friend = rng.sample(world.people, 2)
    animal, adj, obj = rng.choice(ANIMALS), rng.choice(ADJECTIVES), rng.choice(OBJECTS)
    sents = [
        f"One {rng.choice(WEATHER)} {rng.choice(DAYS)}, {hero.name} the {hero.job} went to the "
        f"{rng.choice(PLACES)} in {hero.town}.",
        f"{hero.name} saw {a_an(adj)} {adj} {animal}.",
    ]
    for _ in range(rng.randint(3, 7)):
        verb, kind = rng.choice(VERBS)
        subj = rng.choice([hero.name, friend.name, f"the {animal}"])
        if kind == "object":
            o = rng.choice(OBJECTS)
            sents.append(f"{_cap(subj)} {verb} {a_an(o)} {o}.")
        elif kind == "place":
            sents.append(f"{_cap(subj)} {verb} the {rng.choice(PLACES)}.")
        elif kind == "food":
            sents.append(f"{_cap(subj)} {verb} some {rng.choice(FOODS)}.")
        else:
            other = friend.name if subj != friend.name else hero.name
            sents.append(f"{_cap(subj)} {verb} {other}.")
    sents += rng.sample([
        f"The {animal} was {rng.choice(ADJECTIVES)}.",
        f"{friend.name} said, \"hello, {hero.name}!\"",
        f"{hero.name} gave the {animal} a {rng.choice(COLOURS)} {obj}.",
        f"\"Thank you,\" said {friend.name}.",
        f"It was {rng.choice(WEATHER)} all day.",
    ], 2)
    sents.append(f"In the end, {hero.name} felt {rng.choice(FEELINGS)}.")
    if rng.random() < 0.5:
        sents.append("The end.")
    return " ".join(sents)


def _arithmetic(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(6, 14)):
        r = rng.random()
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if r < 0.45:
            lines.append(f"{a} plus {b} is {a + b}.")
        elif r < 0.65:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a} minus {b} is {a - b}.")
        elif r < 0.75:
            lines.append(f"{_cap(NUMBER_WORDS[a])} plus {NUMBER_WORDS[b]} is {NUMBER_WORDS[a + b]}.")
        elif r < 0.87:
            n1, n2 = rng.sample(NAMES, 2)
            food = rng.choice(COUNTABLE_FOODS)
            lines.append(f"{n1} has {a} {food}. {n2} gives {n1} {b} more. Now {n1} has {a + b} {food}.")
        else:
            lo = rng.randint(0, 12)
            hi = lo + rng.randint(2, 6)
            lines.append(f"Counting from {lo} to {hi}: " + ", ".join(map(str, range(lo, hi + 1))) + ".")
    return "\n".join(lines)


def _category(rng: random.Random) -> str:
    cat = rng.choice(list(CATEGORIES))
    members = rng.sample(CATEGORIES[cat], min(len(CATEGORIES[cat]), rng.randint(3, 8)))
    sents = [f"{_cap(w)} is {a_an(cat)} {cat}." for w in members]
    sents.append(f"Some {CATEGORY_PLURAL[cat]} are " + ", ".join(members[:-1]) + f" and {members[-1]}.")
    rng.shuffle(sents)
    return " ".join(sents)


def _qa(rng: random.Random) -> str:
    form = rng.choice([("Question: ", "Answer: "), ("Q: ", "A: "), ("Someone asked: ", "The reply was: ")])
    lines = []
    for _ in range(rng.randint(3, 6)):
        task = sample_split_task(rng, "train")
        body = answer_body_random(task, rng)
        if rng.random() < 0.25:
            body = f"{rng.choice(POLITE_OPENERS)} {body}"
        lines.append(f"{form[0]}{task.prompt}\n{form[1]}{body}")
    return "\n".join(lines)


def _chat(rng: random.Random) -> str:
    a, b = rng.sample(NAMES, 2)
    word, n, pet = rng.choice(REPEAT_WORDS), rng.choice([2, 3, 4]), rng.choice(ANIMALS)
    turns = [
        f"{a}: Hello, {b}! How are you?",
        f"{b}: Hello, {a}! I am {rng.choice(FEELINGS)}, thank you.",
        rng.choice([
            f"{a}: Can you say the word {word} {N_WORD[n]} times?\n{b}: Sure! " + " ".join([word] * n) + ".",
            f"{a}: What is your favourite colour?\n{b}: I like the colour {rng.choice(COLOURS)}.",
            f"{a}: Where are you going?\n{b}: I am going to the {rng.choice(PLACES)}.",
            f"{a}: Do you have a pet?\n{b}: Yes, I have {a_an(pet)} {pet}.",
        ]),
        rng.choice([f"{a}: Thank you, {b}!", f"{a}: That is nice.", f"{a}: Good to know."]),
        f"{b}: Goodbye, {a}!",
    ]
    return "\n".join(turns)


_MAKERS = {"bio": _bio, "town": _town, "story": _story, "arithmetic": _arithmetic, "category": _category,
           "qa": _qa, "chat": _chat}


def generate_corpus(seed: int = 0, target_bytes: int = 2_621_440) -> list[str]:
    """Documents (no separators) whose total size (plus one 13-byte separator each) reaches `target_bytes`."""
    if target_bytes < 0:
        raise ValueError(f"target_bytes must be >= 0, got {target_bytes}")
    rng = random.Random(f"chatforge-corpus-{seed}")
    kinds, weights = zip(*DOC_KINDS.items())
    docs, total = [], 0
    while total < target_bytes:
        doc = _MAKERS[rng.choices(kinds, weights)[0]](rng)
        docs.append(doc)
        total += len(doc) + len("<|endoftext|>")
    return docs
