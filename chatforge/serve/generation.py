"""One answer as text pieces: a request's tokens from the scheduler, detokenized as they come and cut at stop
strings (:class:`~chatforge.serve.textstream.TextStream`). The routes build OpenAI's JSON from these pieces."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Sequence

from chatforge.generation_request import Request
from chatforge.serve.context import ServedModel, stream_events
from chatforge.serve.textstream import TextStream

# GPT-2's byte-level alphabet: printable bytes map to themselves, the others to U+0100 onwards.
_PRINTABLE = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
    list(range(ord("®"), ord("ÿ") + 1))


def _unicode_to_byte() -> dict[str, int]:
    table, extra = {}, 0
    for b in range(256):
        if b in _PRINTABLE:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF = _unicode_to_byte()


@dataclass
class TokenInfo:
    """One generated (or echoed) token: its id, text, bytes, log-prob and the most likely alternatives."""

    id: int
    logprob: Optional[float]
    top: Optional[list[tuple[int, float]]] = None


@dataclass
class Piece:
    """What one step adds to an answer."""

    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish: Optional[str] = None
    """None while running; "stop" (a stop id or string) or "length"."""


def token_bytes(tok, i: int) -> bytes:
    """The bytes a token stands for (byte-level BPE), or its decoded text's UTF-8 for other tokenizers."""
    s = tok.id_to_token(i)
    if s is not None and i not in tok.special_ids and all(c in _BYTE_OF for c in s):
        return bytes(_BYTE_OF[c] for c in s)
    return (s if i in tok.special_ids and s is not None else tok.decode([i])).encode("utf-8")


def token_text(tok, i: int) -> str:
    """A token as a string for the ``logprobs`` fields (partial UTF-8 bytes shown as U+FFFD)."""
    return token_bytes(tok, i).decode("utf-8", errors="replace")


async def answer_pieces(m: ServedModel, request: Request, stop: Sequence[str]) -> AsyncIterator[Piece]:
    """Run ``request`` on ``m``'s scheduler; yield a :class:`Piece` per new token (``text`` only whole
    characters, nothing past a stop string), the last with ``finish`` set. Closing the iterator early cancels
    the request (its KV-cache row is freed at once)."""
    tok = m.tokenizer
    ts = TextStream(lambda ids: tok.decode(ids, skip_special=True), stop)
    stop_ids = set(request.stop_ids)
    async with aclosing(stream_events(m.scheduler, request)) as events:
        async for piece in _pieces(events, ts, stop_ids):
            yield piece
            if piece.finish is not None:
                return  # leaving the loop closes `events`, which cancels the request


async def _pieces(events, ts: TextStream, stop_ids: set) -> AsyncIterator[Piece]:
    async for ev in events:
        piece = Piece()
        if ev.token is not None:
            piece.tokens.append(TokenInfo(ev.token, ev.logprob, ev.top))
            if ev.token not in stop_ids:
                piece.text = ts.push(ev.token)
        if ts.stopped:
            piece.finish = "stop"
            yield piece
            return
        if ev.finish is not None:
            piece.text += ts.flush()
            if ev.finish == "cancelled":
                raise RuntimeError("the server is shutting down")
            piece.finish = "stop" if ev.finish == "stop" else "length"
        yield piece


async def merge(gens: list[AsyncIterator[Piece]]) -> AsyncIterator[tuple[int, Piece]]:
    """(index, piece) from several answers as each produces them. Closing it cancels every answer left."""
    if len(gens) == 1:  # one answer (the common case): no task and queue in between
        async with aclosing(gens[0]) as g:
            async for p in g:
                yield 0, p
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, g: AsyncIterator[Piece]) -> None:
        try:
            async for p in g:
                await queue.put((i, p))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(tasks)
        while left:
            i, x = await queue.get()
            if x is done:
                left -= 1
            elif isinstance(x, Exception):
                raise x
            else:
                yield i, x
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
