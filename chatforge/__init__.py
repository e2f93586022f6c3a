"""chatforge: pretraining, SFT, reward modeling and RLHF in one small codebase."""

__version__ = "0.1.0"
