"""The native model (Llama architecture), its scalar head and Hugging Face directory I/O."""

from chatforge.model.gpt import GPT, Trunk
from chatforge.model.inference import KVCache
from chatforge.model.heads import ScalarModel, gather_last, last_token_index

__all__ = ["GPT", "KVCache", "Trunk", "ScalarModel", "gather_last", "last_token_index"]
