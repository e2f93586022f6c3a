"""The tokenizer of a Hugging Face model directory, made into a chatforge :class:`ChatTokenizer`.

A directory written by chatforge holds all six chat tokens and loads as is. Any other tokenizer
(GPT-2's, Qwen2's, Llama's...) gets the missing ones added as special tokens, after its own vocabulary
(<|endoftext|> only when absent; GPT-2 already has it):

    <|endoftext|>  <|pad|>  <|system|>  <|user|>  <|assistant|>  <|end|>

Conversations are then rendered in chatforge's one chat format (tokenizer.render_conversation), and
the model directory chatforge writes carries that format as its chat template. The caller resizes
the model's embeddings and initialises the new rows to the mean embedding
(:func:`chatforge.model.load.fit_vocab`).

Only a *fast* tokenizer (``tokenizer.json``, or one transformers can convert to it) can be fixed
this way; anything else is a :class:`TokenizerDirError` naming the directory and what is missing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Union

from tokenizers import AddedToken, Tokenizer

from chatforge.errors import ChatforgeError
from chatforge.tokenizer import CHAT_TEMPLATE, CHAT_TEMPLATE_FILE, SPECIAL_TOKENS, TOKENIZER_FILE, ChatTokenizer

log = logging.getLogger("chatforge.model")


TOKENIZER_FILES = (TOKENIZER_FILE, "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model",
                   "vocab.txt")


class TokenizerDirError(ChatforgeError, ValueError):
    """A model directory whose tokenizer is missing or cannot be given chatforge's chat tokens."""


def _backend(path: Path, trust_remote_code: bool) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` of a directory: tokenizer.json, else via transformers' AutoTokenizer."""
    f = path / TOKENIZER_FILE
    if f.is_file():
        try:
            return Tokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerDirError(f"{f}: cannot read tokenizer: {e}") from None
    if not any((path / n).is_file() for n in TOKENIZER_FILES):
        raise TokenizerDirError(f"{path}: no usable tokenizer (none of {', '.join(TOKENIZER_FILES)}); put the "
                                "model's tokenizer files (tokenizer.json) in the directory")
    try:
        from transformers import AutoTokenizer

        hf_tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except Exception as e:
        raise TokenizerDirError(f"{path}: no usable tokenizer (no {TOKENIZER_FILE}, and transformers' AutoTokenizer "
                                f"failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}); put the "
                                f"model's tokenizer files (tokenizer.json) in the directory") from None
    backend = getattr(hf_tok, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerDirError(f"{path}: the tokenizer ({type(hf_tok).__name__}) is a slow tokenizer without "
                                f"{TOKENIZER_FILE}; chatforge's chat tokens {', '.join(SPECIAL_TOKENS)} cannot be "
                                "added to it. Convert it to a fast tokenizer (tokenizer.json) first")
    return Tokenizer.from_str(backend.to_str())


def own_chat_template(path: Path) -> Optional[str]:
    """The directory's chat template when it is not chatforge's (chat_template.jinja or tokenizer_config.json)."""
    template = None
    if (path / CHAT_TEMPLATE_FILE).is_file():
        template = (path / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    elif (path / "tokenizer_config.json").is_file():
        try:
            template = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
        except (json.JSONDecodeError, AttributeError):
            template = None
    return template if template and template != CHAT_TEMPLATE else None


def load_chat_tokenizer(path: Union[str, Path], trust_remote_code: bool = False) -> tuple[ChatTokenizer, list[int]]:
    """(ChatTokenizer of the directory, ids of the chat tokens that had to be added, in order)."""
    path = Path(path)
    tok = _backend(path, trust_remote_code)
    vocab = tok.get_vocab(with_added_tokens=True)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        if own_chat_template(path):
            log.warning("%s: the model brings its own chat template; chatforge trains in its own chat format "
                        "(adding %s) and the directories it writes carry chatforge's template", path,
                        ", ".join(missing))
        n = tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        vocab = tok.get_vocab(with_added_tokens=True)
        if n != len(missing) or any(t not in vocab for t in missing):
            raise TokenizerDirError(f"{path}: could not add the chat tokens {', '.join(missing)} to the tokenizer")
    return ChatTokenizer(tok, source=str(path)), [vocab[t] for t in missing]
