"""Programmatic rewards for the RL tests (importable as 'tests.rewards:function')."""


def letter_e(prompt: str, response: str) -> float:
    """The share of the letter 'e' among the response's characters (0 for an empty response)."""
    return response.count("e") / max(1, len(response))


def nan_reward(prompt: str, response: str) -> float:
    """A broken reward (NaN), for the error-path tests."""
    return float("nan")
