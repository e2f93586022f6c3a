"""Incremental detokenization and stop strings (chatforge/serve/textstream.py), token by token on a
bytes-only tokenizer (one token per byte, so multi-byte characters span several tokens)."""

import pytest

from chatforge.serve.textstream import TextStream
from chatforge.tokenizer import train_tokenizer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["x"], 0)  # bytes only: each UTF-8 byte is one token


def run(tok, text, stop=()):
    ts = TextStream(tok.decode, stop)
    pieces = [ts.push(i) for i in tok.encode(text)]
    return ts, pieces, ts.flush()


def test_text_is_released_only_as_whole_characters(tok):
    ts, pieces, last = run(tok, "a日b")
    assert pieces == ["a", "", "", "日", "b"] and last == ""  # 日 is three bytes = three tokens
    assert ts.text == "a日b" and not ts.stopped


def test_a_cut_character_at_the_end_is_flushed_as_replacement(tok):
    ts = TextStream(tok.decode)
    ids = tok.encode("é")
    assert ts.push(ids[0]) == ""
    assert ts.flush() == "\ufffd"


def test_stop_string_across_tokens_cuts_the_text(tok):
    ts, pieces, last = run(tok, "hello STOP world", ["STOP"])
    assert "".join(pieces) + last == "hello " and ts.stopped
    assert pieces[:6] == list("hello ") and all(p == "" for p in pieces[6:])
    assert ts.push(tok.encode("x")[0]) == ""  # nothing after a stop


def test_a_possible_stop_prefix_is_held_until_it_is_not_one(tok):
    ts, pieces, last = run(tok, "aSTARb", ["STOP"])
    assert pieces == ["a", "", "", "STA", "R", "b"] and not ts.stopped  # "ST" held back, released with "A"
    ts, pieces, last = run(tok, "aST", ["STOP"])
    assert "".join(pieces) == "a" and last == "ST"  # at the end, the held tail is sent


def test_earliest_of_several_stop_strings_wins(tok):
    ts, pieces, last = run(tok, "one, two. three", ["three", "."])
    assert "".join(pieces) + last == "one, two" and ts.stopped
    ts, pieces, last = run(tok, "x日本y", ["本"])
    assert "".join(pieces) + last == "x日"
