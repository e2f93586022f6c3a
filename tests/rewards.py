"""Programmatic rewards for the RL tests (importable as 'tests.rewards:function')."""

from chatforge.demo.rewards import letter_e  # noqa: F401  (the tests name it as tests.rewards:letter_e)


def nan_reward(prompt: str, response: str) -> float:
    """A broken reward (NaN), for the error-path tests."""
    return float("nan")
