"""Judge functions for `chatforge compare` tests (importable as 'tests.judges:function')."""


def vowels_mod_3(prompt: str, response: str) -> float:
    """A coarse, deterministic score (vowels in the answer, mod 3): wins, ties and losses all happen."""
    return float(sum(ch in "aeiou" for ch in response) % 3)
