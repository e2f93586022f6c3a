"""Programmatic rewards for RL on the demo world (``--rl.reward_fn=chatforge.demo.rewards:NAME``), and a ranking
function for trying a recipe out (``--recipe.comparisons.ranker=chatforge.demo.rewards:rank_letter_e``).

Each is a function of the prompt text and the response text returning a float.
"""

from chatforge.demo.judge import gold_score


def letter_e(prompt: str, response: str) -> float:
    """The share of the letter 'e' among the response's characters (0 for an empty response)."""
    return response.count("e") / max(1, len(response))


def gold(prompt: str, response: str) -> float:
    """The demo world's gold judge (what its labellers prefer), used directly as the reward."""
    return gold_score(prompt, response)


def rank_letter_e(prompt, responses: list[str]) -> list[float]:
    """A ranking function for ``recipe.comparisons.ranker`` (prompt, responses) -> scores: the answers richest in
    the letter 'e' rank first (a rule-based labeller for trying a recipe out; write your own for real feedback)."""
    return [letter_e("", r) for r in responses]
