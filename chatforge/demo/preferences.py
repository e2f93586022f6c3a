"""Preference labelling with the gold judge: noisy labels for training, noise-free labels for evaluation.

`label_pairs` labels any two responses (the pipeline calls it on SFT-model samples, as InstructGPT did);
`variant_pairs` builds controlled pairs from the task families: a careful answer against a degraded variant of
it (impolite, rambling, wrong content, cut off, off-task, looping), plus pairs of two random demonstrator styles.
"""

from __future__ import annotations

import random

from chatforge.demo.judge import gold_score
from chatforge.demo.demonstrators import (
    POLITE_OPENERS, STYLES, answer_body_random, demonstrate, off_task_body, style_response, wrong_body,
)
from chatforge.demo.tasks import Task, sample_prompts

TIE_EPS = 1e-9

VARIANT_KINDS = {
    "impolite": 0.20, "rambling": 0.15, "wrong": 0.15, "cutoff": 0.15,
    "off_task": 0.10, "loop": 0.05, "style_mix": 0.20,
}
"""How often each kind of controlled pair appears in `variant_pairs`."""


def gold_prefers(prompt, response_a: str, response_b: str) -> bool | None:
    """Noise-free gold label: True if a is preferred, False if b is, None for a tie."""
    sa, sb = gold_score(prompt, response_a), gold_score(prompt, response_b)
    if abs(sa - sb) <= TIE_EPS:
        return None
    return sa > sb


def label_pairs(prompt, response_a: str, response_b: str, rng, noise: float = 0.1) -> tuple[str, str] | None:
    """(chosen, rejected) by the gold judge, flipped with probability `noise`; None for a tie.

    `rng` is anything with a `.random()` method (random.Random or numpy.random.Generator).
    """
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"label noise must lie in [0, 1], got {noise}")
    pref = gold_prefers(prompt, response_a, response_b)
    if pref is None:
        return None
    chosen, rejected = (response_a, response_b) if pref else (response_b, response_a)
    if rng.random() < noise:
        chosen, rejected = rejected, chosen
    return chosen, rejected


def careful_answer(task: Task, rng: random.Random) -> str:
    """The best demonstrator's answer."""
    return demonstrate(task, rng, style="careful")


def degrade(task: Task, good: str, kind: str, rng: random.Random) -> str:
    """A worse variant of a careful answer. `good` is the careful answer it degrades."""
    body = answer_body_random(task, rng)
    if kind == "impolite":
        return style_response(body, rng.choice(["rude", "rude", "plain"]), rng)
    if kind == "rambling":
        return style_response(body, "rambling", rng)
    if kind == "wrong":
        return style_response(wrong_body(task, rng), "careful", rng)
    if kind == "cutoff":
        words = good.split()
        cut = rng.randint(max(1, len(words) // 2), max(1, len(words) - 1)) if len(words) > 1 else 1
        return " ".join(words[:cut]).rstrip(".!?,") + rng.choice(["", " and", " so"])
    if kind == "off_task":
        return style_response(off_task_body(task, rng), "careful", rng)
    if kind == "loop":
        sentence = body
        return f"{rng.choice(POLITE_OPENERS)} " + " ".join([sentence] * rng.randint(2, 4))
    raise ValueError(f"unknown variant kind {kind!r}; expected one of {sorted(VARIANT_KINDS)}")


def variant_pairs(seed: int, n: int, noise: float = 0.1) -> list[dict]:
    """`n` labelled pairs from the training bucket: {"prompt", "chosen", "rejected", "kind"}.

    "kind" names how the pair was built (see VARIANT_KINDS); files.py writes only prompt/chosen/rejected.
    Ties are skipped and redrawn.
    """
    rng = random.Random(f"chatforge-pairs-{seed}")
    label_rng = random.Random(f"chatforge-pair-labels-{seed}")
    kinds, weights = zip(*VARIANT_KINDS.items())
    styles = list(STYLES)
    out: list[dict] = []
    while len(out) < n:
        for task in sample_prompts(rng, n - len(out), "train", distinct=False):
            kind = rng.choices(kinds, weights)[0]
            if kind == "style_mix":
                s1, s2 = rng.sample(styles, 2)
                a, b = demonstrate(task, rng, s1), demonstrate(task, rng, s2)
            else:
                a = careful_answer(task, rng)
                b = degrade(task, a, kind, rng)
            if rng.random() < 0.5:
                a, b = b, a
            labelled = label_pairs(task.prompt, a, b, label_rng, noise)
            if labelled is None:
                continue
            out.append({"prompt": task.prompt, "chosen": labelled[0], "rejected": labelled[1], "kind": kind})
    return out


__all__ = ["gold_prefers", "label_pairs", "variant_pairs", "degrade", "careful_answer", "VARIANT_KINDS"]
