"""The tokenizer: byte-level BPE (Hugging Face `tokenizers`) plus the chat format.

Vocabulary layout (fixed, for every vocabulary size):

    ids 0..5      the special tokens, in SPECIAL_TOKENS order:
                  <|endoftext|>=0  <|pad|>=1  <|system|>=2  <|user|>=3  <|assistant|>=4  <|end|>=5
    ids 6..261    the 256 byte symbols (GPT-2's byte-to-unicode alphabet), so every byte string is encodable
    ids 262..     BPE merges, most frequent first, up to ``vocab_size`` in total

``vocab_size`` counts everything; ``vocab_size=0`` means bytes only (262 tokens, no merges: one token
per byte, i.e. character-level on ASCII).

Special tokens are control tokens. ``ChatTokenizer.encode`` treats text as text: a special-token
string inside ordinary text (user content, a pretraining document) is encoded as plain bytes, never as
the special id, so user content cannot inject a turn boundary. Special ids enter a sequence only through
the renderer below (chat) or the data layer (which splits pretraining text on "<|endoftext|>" *before*
encoding and inserts the id itself).

Chat format (the one used by SFT, RM, PPO, DPO, GRPO and by the saved Jinja template):

    <|endoftext|><|system|>{system}<|end|><|user|>{user}<|end|><|assistant|>{reply}<|end|>...

A generation prompt ends with ``<|assistant|>``; the model ends its turn with ``<|end|>`` (the stop
token). The loss mask is 1 on assistant content tokens and their ``<|end|>``, 0 elsewhere (BOS, role
tokens, system and user turns).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from chatforge.errors import ChatforgeError, UserInputError

# ----------------------------------------------------------------------------------------------------
# special tokens

ENDOFTEXT = "<|endoftext|>"  # document boundary; also BOS of every document and rendered conversation
PAD = "<|pad|>"  # padding only; distinct from every end token
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"  # end of turn = the stop token of chat generation

SPECIAL_TOKENS = (ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, END)  # their ids are 0..5, in this order
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
N_BYTES = 256
MIN_VOCAB = len(SPECIAL_TOKENS) + N_BYTES  # 262: the bytes-only vocabulary

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# The Jinja equivalent of render_conversation (tested token for token, mask included, through
# transformers' apply_chat_template). {% generation %} marks exactly what the loss mask covers:
# assistant content and its <|end|>; the <|assistant|> role token stays outside (mask 0).
CHAT_TEMPLATE = (
    "{{- '<|endoftext|>' -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}\n"
    "{{- raise_exception('message ' ~ loop.index0 ~ ': unknown role \\'' ~ message['role'] ~ '\\' (expected system, user or assistant)') -}}\n"
    "{%- endif -%}\n"
    "{%- if loop.first and message['role'] == 'assistant' -%}\n"
    "{{- raise_exception('message 0: a conversation must start with a system or user message, not assistant') -}}\n"
    "{%- endif -%}\n"
    "{%- if message['role'] == 'system' -%}\n"
    "{%- if not loop.first -%}\n"
    "{{- raise_exception('message ' ~ loop.index0 ~ ': a system message is only allowed first') -}}\n"
    "{%- endif -%}\n"
    "{{- '<|system|>' + message['content'] + '<|end|>' -}}\n"
    "{%- elif message['role'] == 'user' -%}\n"
    "{{- '<|user|>' + message['content'] + '<|end|>' -}}\n"
    "{%- else -%}\n"
    "{%- if message['content'] | trim == '' -%}\n"
    "{{- raise_exception('message ' ~ loop.index0 ~ ': empty assistant content') -}}\n"
    "{%- endif -%}\n"
    "{{- '<|assistant|>' -}}\n"
    "{%- generation -%}\n"
    "{{- message['content'] + '<|end|>' -}}\n"
    "{%- endgeneration -%}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "{{- '<|assistant|>' -}}\n"
    "{%- endif -%}\n"
)


class ConversationError(ChatforgeError, ValueError):
    """A malformed conversation; the message names the message index and the problem (the data layer
    prefixes file and line)."""


# ----------------------------------------------------------------------------------------------------
# the tokenizer


class ChatTokenizer:
    """A byte-level BPE ``tokenizers.Tokenizer`` with chatforge's special tokens.

    ``encode`` never produces special ids from text; special ids come from the renderer.
    """

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>"):
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise UserInputError(
                f"{source}: not a chatforge tokenizer: missing special tokens {', '.join(missing)} "
                f"(train one with `chatforge tokenizer` or train_tokenizer())"
            )
        # canonical serialization, taken before we flip the runtime-only encode flag below
        self._json = tokenizer.to_str()
        self._tok = Tokenizer.from_str(self._json)
        self._tok.encode_special_tokens = True  # special strings in text -> plain bytes (not serialized)
        self.source = source
        self.eot_id = vocab[ENDOFTEXT]
        self.bos_id = self.eot_id  # <|endoftext|> doubles as BOS
        self.pad_id = vocab[PAD]
        self.system_id = vocab[SYSTEM]
        self.user_id = vocab[USER]
        self.assistant_id = vocab[ASSISTANT]
        self.end_id = vocab[END]
        self.special_ids = frozenset(vocab[t] for t in SPECIAL_TOKENS)

    # -- encoding -----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (the model's embedding rows)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Text -> ids. No BOS/EOS is added; special-token strings in ``text`` are encoded as bytes."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts -> ids (parallel in Rust); same rules as :meth:`encode`."""
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode_batch: item {i} is a {type(t).__name__}, not a str")
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # fast: no offsets
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids -> text. Bytes that do not form valid UTF-8 (a cut multi-byte char) become U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> Optional[str]:
        return self._tok.id_to_token(i)

    def role_id(self, role: str) -> int:
        """The id of a role's header token: 'system', 'user' or 'assistant'."""
        if role not in ROLE_TOKENS:
            raise ConversationError(f"unknown role {role!r} (expected system, user or assistant)")
        return {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}[role]

    # -- persistence --------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """sha256 hex digest of the canonical tokenizer.json serialization (provenance)."""
        return hashlib.sha256(self._json.encode("utf-8")).hexdigest()

    def save(self, directory: Union[str, Path], model_max_length: Optional[int] = None) -> Path:
        """Write a Hugging Face tokenizer directory.

        Files: tokenizer.json, tokenizer_config.json (PreTrainedTokenizerFast, special tokens, and the chat
        template for transformers < 4.48), chat_template.jinja (where transformers >= 4.48 reads it; it
        wins when both exist) and special_tokens_map.json.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / TOKENIZER_FILE).write_text(json.dumps(json.loads(self._json), ensure_ascii=False, indent=2), encoding="utf-8")
        special_map = {"bos_token": ENDOFTEXT, "eos_token": END, "pad_token": PAD}
        added = {
            str(self._tok.token_to_id(t)): {
                "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True,
            }
            for t in SPECIAL_TOKENS
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            "unk_token": None,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": added,
            "chat_template": CHAT_TEMPLATE,
        }
        if model_max_length is not None:
            config["model_max_length"] = int(model_max_length)
        (d / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        (d / CHAT_TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")
        (d / SPECIAL_TOKENS_MAP_FILE).write_text(json.dumps(special_map, indent=2), encoding="utf-8")
        return d

    @classmethod
    def load(cls, path: Union[str, Path]) -> "ChatTokenizer":
        """Load from a tokenizer directory, any model directory holding tokenizer.json, or the file itself."""
        p = Path(path)
        f = p if p.is_file() else p / TOKENIZER_FILE
        if not p.exists():
            raise FileNotFoundError(f"tokenizer path '{p}' does not exist")
        if not f.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} in '{p}' (expected a tokenizer or model directory)")
        try:
            tok = Tokenizer.from_file(str(f))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise UserInputError(f"{f}: cannot read tokenizer: {e}") from None
        return cls(tok, source=str(f))

    def __repr__(self) -> str:
        return f"ChatTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


# ----------------------------------------------------------------------------------------------------
# training


def _empty_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2 regex split
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    texts: Union[Iterable[str], Iterator[str]],
    vocab_size: int,
    show_progress: Optional[bool] = None,
) -> ChatTokenizer:
    """Train a byte-level BPE on ``texts`` (documents) to exactly ``vocab_size`` ids in total.

    ``vocab_size`` includes the 6 special tokens and the 256 bytes; 0 means bytes only (``texts`` is not
    read). Fewer ids result only when the corpus runs out of pairs to merge. Deterministic for a given
    corpus. ``show_progress=None`` shows the `tokenizers` progress bar when stderr is a terminal.
    """
    if vocab_size != 0 and vocab_size < MIN_VOCAB:
        raise UserInputError(
            f"tokenizer vocab_size={vocab_size} is too small: use 0 (bytes only, {MIN_VOCAB} ids) "
            f"or at least {MIN_VOCAB} (6 special tokens + 256 bytes)"
        )
    if isinstance(texts, str):
        texts = [texts]  # one document, not an iterator over its characters
    if show_progress is None:
        show_progress = sys.stderr.isatty()
    tok = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size or MIN_VOCAB,
        min_frequency=2,  # a pair seen once is not worth a merge
        special_tokens=list(SPECIAL_TOKENS),  # ids 0..5
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=bool(show_progress),
    )
    tok.train_from_iterator(iter(()) if vocab_size == 0 else texts, trainer=trainer)
    return ChatTokenizer(tok, source="trained")


# ----------------------------------------------------------------------------------------------------
# chat rendering: the ONE chat format function


def _check_messages(messages: list[dict]) -> None:
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ConversationError("empty conversation: expected a non-empty list of {role, content} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError(f"message {i}: expected a dict with 'role' and 'content', got {m!r:.80}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ConversationError(f"message {i}: unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise ConversationError(f"message {i} ({role}): content must be a string, got {type(content).__name__}")
        if role == "system" and i != 0:
            raise ConversationError(f"message {i}: a system message is only allowed first")
        if i == 0 and role == "assistant":
            raise ConversationError("message 0: a conversation must start with a system or user message, not assistant")
        if role == "assistant" and not content.strip():
            raise ConversationError(f"message {i}: empty assistant content")


def render_conversation(
    tok: ChatTokenizer, messages: list[dict], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Messages -> (ids, loss_mask), both of length T.

    ids:  <|endoftext|> then per message <|role|> encode(content) <|end|>; + <|assistant|> if
          add_generation_prompt.
    mask: 1 on assistant content tokens and their <|end|>, 0 elsewhere.
    Raises ConversationError (a ValueError) for an unknown role, a system message not first, a
    conversation starting with assistant, or empty assistant content.
    """
    _check_messages(messages)
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        body = tok.encode(m["content"]) + [tok.end_id]
        train = 1 if m["role"] == "assistant" else 0
        ids += [tok.role_id(m["role"])] + body
        mask += [0] + [train] * len(body)
    if add_generation_prompt:
        ids.append(tok.assistant_id)
        mask.append(0)
    return ids, mask


def render_prompt(tok: ChatTokenizer, messages: list[dict]) -> list[int]:
    """The ids a model continues to answer ``messages``: the rendering ending in <|assistant|>."""
    return render_conversation(tok, messages, add_generation_prompt=True)[0]


def render_response(tok: ChatTokenizer, text: str) -> list[int]:
    """An assistant reply's ids, to append to :func:`render_prompt`: encode(text) + [<|end|>].

    render_prompt(m) + render_response(r) == render_conversation(m + [assistant r])[0].
    """
    if not isinstance(text, str):
        raise ConversationError(f"response must be a string, got {type(text).__name__}")
    if not text.strip():
        raise ConversationError("empty assistant content")
    return tok.encode(text) + [tok.end_id]
