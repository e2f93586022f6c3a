"""The invented demo world: people, towns, animals, colours, jobs, foods, and the facts that tie them together.

The facts are a fixed part of the demo (built from `WORLD_SEED`), like a small encyclopaedia: the demo's `seed`
changes which text, conversations and prompts are sampled, never what is true. That keeps the gold judge a pure
function of (prompt, response) text.

All words are plain lower-case ASCII (names and towns capitalised), short, and chosen so that no word belongs to
two categories (the judge looks words up by category).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

WORLD_SEED = 0

NAMES = [
    "Anna", "Tom", "Mira", "Ben", "Lila", "Sam", "Nora", "Finn", "Ada", "Leo",
    "Ivy", "Max", "Rosa", "Otto", "Zoe", "Hugo", "Ella", "Jack", "Maya", "Noah",
    "Lucy", "Theo", "Ruby", "Oscar", "Iris", "Felix", "Cora", "Milo", "Vera", "Eli",
    "Hana", "Jonas", "Tara", "Kai", "Lena", "Paul", "Greta", "Rami", "Sofia", "Dan",
    "Wren", "Bruno", "Elsa", "Ivan", "Nell", "Omar", "Pia", "Ravi", "Tess", "Yuri",
    "Alba", "Cyril", "Dora", "Emil", "Fay", "Gil", "Hilda", "Ines", "Jude", "Kira",
]
"""People of the world, one fact sheet each."""

TOWNS = [
    "Bree", "Oakvale", "Lumen", "Fernhill", "Stonebrook", "Marrow", "Duskport", "Willowby",
    "Pebbleton", "Cragmoor", "Sunmere", "Brightwater", "Ashford", "Elmstead", "Glimmerton", "Holloway",
]
ANIMALS = [
    "cat", "dog", "fox", "owl", "goat", "horse", "rabbit", "duck", "frog", "mouse",
    "sheep", "pig", "cow", "hen", "turtle", "parrot", "hamster", "lizard", "bee", "crow",
]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "grey", "gold"]
JOBS = [
    "baker", "farmer", "teacher", "doctor", "painter", "builder", "singer", "sailor", "tailor", "potter",
    "miller", "fisher", "gardener", "nurse", "cook", "writer", "driver", "dancer", "carpenter", "weaver",
]
FOODS = [
    "bread", "soup", "rice", "cheese", "apples", "pears", "plums", "honey", "beans", "carrots",
    "pasta", "cake", "porridge", "noodles", "eggs", "grapes", "corn", "pie", "nuts", "berries",
]
CATEGORIES = {"colour": COLOURS, "animal": ANIMALS, "job": JOBS, "food": FOODS, "town": TOWNS}
"""Category name -> members. The judge checks 'name a colour' style answers against these."""

CATEGORY_PLURAL = {"colour": "colours", "animal": "animals", "job": "jobs", "food": "foods", "town": "towns"}

# Words for stories and descriptions (not category members).
OBJECTS = [
    "basket", "lamp", "boat", "kite", "drum", "book", "hat", "cup", "box", "ball", "rope", "bell", "map",
    "key", "coat", "bag", "chair", "table", "window", "door", "letter", "flute", "shell", "stone", "ring",
    "candle", "blanket", "bucket", "ladder", "wagon",
]
ADJECTIVES = [
    "small", "big", "old", "new", "happy", "sad", "quiet", "loud", "warm", "cold", "kind", "brave", "tired",
    "hungry", "clever", "gentle", "busy", "lazy", "quick", "slow", "bright", "dark", "tall", "short", "soft",
    "funny", "shy", "proud", "calm", "curious", "lucky", "careful", "sleepy", "wild", "tiny", "friendly",
]
PLACES = [
    "market", "river", "forest", "hill", "garden", "bridge", "school", "library", "harbour", "meadow",
    "square", "mill", "lake", "farm", "bakery", "field", "beach", "cave", "tower", "park",
]
TOWN_FEATURES = [
    "near a wide river", "on a green hill", "by the sea", "at the edge of a dark forest", "in a quiet valley",
    "beside a big lake", "under tall mountains", "in the middle of wide fields",
]
WEATHER = ["sunny", "rainy", "windy", "snowy", "foggy", "cloudy", "stormy", "warm"]
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]
SEASONS = ["spring", "summer", "autumn", "winter"]
VERBS = [  # (past tense, object kind): used by the story generator
    ("found", "object"), ("lost", "object"), ("carried", "object"), ("painted", "object"), ("fixed", "object"),
    ("bought", "object"), ("made", "object"), ("cleaned", "object"), ("dropped", "object"), ("hid", "object"),
    ("visited", "place"), ("walked to", "place"), ("ran to", "place"), ("looked at", "place"),
    ("cooked", "food"), ("ate", "food"), ("shared", "food"), ("baked", "food"), ("sold", "food"),
    ("met", "person"), ("helped", "person"), ("called", "person"), ("thanked", "person"), ("waved at", "person"),
]
FEELINGS = ["happy", "glad", "proud", "calm", "surprised", "tired", "excited", "sleepy", "thankful", "cheerful"]

# Words the "repeat the word X" task draws from: short, unambiguous, not names.
REPEAT_WORDS = sorted(set(ANIMALS + COLOURS + OBJECTS + [a for a in ADJECTIVES if len(a) <= 6] + [
    "sun", "moon", "star", "tree", "leaf", "rain", "snow", "wind", "bird", "fish", "hello", "yes", "no",
]))

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
                "nineteen", "twenty"]

RELATIONS = ["town", "job", "pet", "colour", "food"]
"""Facts each person has; the value of relation r is a member of RELATION_CATEGORY[r]."""
RELATION_CATEGORY = {"town": "town", "job": "job", "pet": "animal", "colour": "colour", "food": "food"}


@dataclass(frozen=True)
class Person:
    """One person's fact sheet."""

    name: str
    town: str
    job: str
    pet: str
    colour: str
    food: str

    def fact(self, relation: str) -> str:
        """The value of one relation ('town', 'job', 'pet', 'colour', 'food')."""
        return getattr(self, relation)


@dataclass(frozen=True)
class World:
    """Everything that is true in the demo world."""

    people: tuple[Person, ...]
    town_feature: dict

    def person(self, name: str) -> Person:
        """The fact sheet of `name` (case-insensitive); KeyError if nobody has that name."""
        for p in self.people:
            if p.name.lower() == name.lower():
                return p
        raise KeyError(f"no person named {name!r} in the demo world")

    def residents(self, town: str) -> list[Person]:
        return [p for p in self.people if p.town == town]


@lru_cache(maxsize=4)
def make_world(seed: int = WORLD_SEED) -> World:
    """Build the world deterministically from `seed` (the demo always uses WORLD_SEED)."""
    rng = random.Random(f"chatforge-world-{seed}")
    people = tuple(
        Person(name=n, town=rng.choice(TOWNS), job=rng.choice(JOBS), pet=rng.choice(ANIMALS),
               colour=rng.choice(COLOURS), food=rng.choice(FOODS))
        for n in NAMES
    )
    features = {t: rng.choice(TOWN_FEATURES) for t in TOWNS}
    return World(people=people, town_feature=features)


def get_world() -> World:
    """The demo's world (facts fixed by WORLD_SEED)."""
    return make_world(WORLD_SEED)


def a_an(word: str) -> str:
    """'a' or 'an' for the word that follows."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def category_of(word: str) -> str | None:
    """The category a word belongs to, or None."""
    w = word.lower()
    for cat, members in CATEGORIES.items():
        if w in (m.lower() for m in members):
            return cat
    return None


def all_vocabulary() -> set[str]:
    """Every content word the world defines (lower-case)."""
    words: set[str] = set()
    for lst in (NAMES, TOWNS, ANIMALS, COLOURS, JOBS, FOODS, OBJECTS, ADJECTIVES, PLACES, WEATHER, DAYS,
                SEASONS, FEELINGS, NUMBER_WORDS):
        words.update(w.lower() for w in lst)
    words.update(v.split()[0] for v, _ in VERBS)
    return words
