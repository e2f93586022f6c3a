"""``chatforge chat --model DIR``: a terminal chat with streamed tokens.

The conversation so far is rendered in the chat format each turn (tokenizer.render_prompt), so the model sees
the whole history (the oldest turns are dropped when it outgrows the context, and a note says so). Slash
commands: ``/help`` lists them, ``/reset`` starts over, ``/quit`` (or end of input, Ctrl-D) leaves; an unknown
``/word`` is not sent to the model; ``//text`` sends ``/text``. Ctrl-C stops the answer being written (the
part shown stays in the history); Ctrl-C at the prompt leaves. A note says when an answer stopped at the
context length or at ``--max-new-tokens``, or when a message was cut to fit the context.

With piped input (not a terminal) each line is one user turn and only the answers are printed on stdout, one
per line; notes and command replies go to stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Callable, Optional, Sequence

COMMANDS = {
    "/help": "list these commands",
    "/reset": "forget the conversation and start over",
    "/quit": "leave (also Ctrl-D, or Ctrl-C at the prompt)",
}
_COMMAND = re.compile(r"/[A-Za-z]")  # a line starting with /word is a command (never sent to the model)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a language model directory (base/, sft/, ppo/, ...)")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


def fit_history(tok, system: list[dict], history: list[dict], block_size: int, reserve: int) -> list[int]:
    """The prompt ids of system + history, dropping the oldest exchanges until it leaves ``reserve`` tokens."""
    from chatforge.tokenizer import render_prompt

    h = list(history)
    while True:
        ids = render_prompt(tok, system + h)
        if len(ids) + reserve <= block_size or len(h) <= 1:
            return ids[-(block_size - 1):] if len(ids) >= block_size else ids
        h = h[2:] if len(h) > 2 else h[-1:]


def stop_note(prompt_len: int, new_ids: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int,
              block_size: int) -> Optional[str]:
    """Why an answer ended without a stop token, in words (None when it ended with one)."""
    if new_ids and new_ids[-1] in stop_ids:
        return None
    if prompt_len + len(new_ids) >= block_size:
        return (f"the answer stopped at the model's context length ({block_size} tokens, "
                f"{prompt_len} of them the input)")
    if len(new_ids) >= max_new_tokens:
        return f"the answer stopped at --max-new-tokens ({max_new_tokens})"
    return None


def read_line(interactive: bool) -> Optional[str]:
    """The next line the user typed (or piped), or None when they leave (end of input, Ctrl-C at the prompt)."""
    try:
        if interactive:
            try:
                return input("you> ")
            except EOFError:
                print()
                return None
        line = sys.stdin.readline()
        return line if line else None
    except KeyboardInterrupt:  # Ctrl-C at the prompt: leave
        if interactive:
            print()
        return None


def run_command(command: str, say: Callable[[str], None]) -> Optional[str]:
    """Carry out a slash command: "quit", "reset" (the caller forgets the history) or None (a reply was said)."""
    if command == "/quit":
        return "quit"
    if command == "/reset":
        say("(history cleared)")
        return "reset"
    if command == "/help":
        say("\n".join(f"  {c:<8} {h}" for c, h in COMMANDS.items()) +
            "\n  //text   send a message that starts with a slash ('/text')")
    else:
        say(f"(unknown command {command}; /help lists the commands; nothing was sent to the model)")
    return None


def turn_prompt(tok, system: list[dict], history: list[dict], block_size: int, max_new_tokens: int,
                say: Callable[[str], None]) -> list[int]:
    """The prompt ids of this turn (fit to the context), with a note when the message or old turns were cut."""
    from chatforge.tokenizer import render_prompt

    reserve = min(max_new_tokens, block_size // 2)
    ids = fit_history(tok, system, history, block_size, reserve)
    alone = render_prompt(tok, system + history[-1:])
    if len(alone) > len(ids):
        say(f"(note: your message is {len(alone)} tokens with the chat format, more than the model's context "
            f"of {block_size}; only its last {len(ids)} tokens are read)")
    elif len(ids) < len(render_prompt(tok, system + history)):
        say("(note: the oldest turns were dropped to fit the model's context)")
    return ids


def stream_answer(engine, tok, ids: list[int], args: argparse.Namespace, stop: list[int], gen,
                  interactive: bool) -> tuple[list[int], bool, bool]:
    """Print the answer as it is written -> (its new ids, ended with a stop token, stopped by Ctrl-C)."""
    if interactive:
        print("bot> ", end="", flush=True)
    out: list[int] = []
    shown = ""

    def visible(text: str) -> str:  # piped: one answer per output line
        return text if interactive else text.replace("\r", " ").replace("\n", " ")

    ended, stopped = False, False
    try:
        for t in engine.stream(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, stop_ids=stop, generator=gen):
            if t in stop:
                ended = True
                break
            out.append(t)
            text = tok.decode(out, skip_special=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(visible(text[len(shown):]), end="", flush=True)
                shown = text
    except KeyboardInterrupt:  # Ctrl-C while answering: stop this answer, keep the chat
        if not interactive:
            raise
        stopped = True
    print(visible(tok.decode(out, skip_special=True)[len(shown):]), flush=True)
    return out, ended, stopped


def main(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from chatforge.engine import Engine
    from chatforge.model.load import load_causal_lm

    model, mcfg, tok = load_causal_lm(args.model, args.device)
    model.eval()
    engine = Engine(model)
    gen = torch.Generator().manual_seed(args.seed)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    stop = [tok.end_id, tok.eot_id]

    def say(text: str) -> None:  # replies and notes: on the terminal, or stderr when piped
        print(text, file=sys.stdout if interactive else sys.stderr, flush=True)

    if interactive:
        print(f"chatforge chat with {args.model} — /help lists the commands, Ctrl-C stops an answer")
    while True:
        line = read_line(interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if _COMMAND.match(line):
            action = run_command(line.split()[0], say)
            if action == "quit":
                break
            if action == "reset":
                history = []
            continue
        if line.startswith("//"):
            line = line[1:]
        history.append({"role": "user", "content": line})
        ids = turn_prompt(tok, system, history, mcfg.block_size, args.max_new_tokens, say)
        out, ended, stopped = stream_answer(engine, tok, ids, args, stop, gen, interactive)
        answer = tok.decode(out, skip_special=True).strip()
        history.append({"role": "assistant", "content": answer or "..."})
        if stopped:
            say("(answer stopped; Ctrl-C again or Ctrl-D to quit)")
        elif not ended:
            note = stop_note(len(ids), out, stop, args.max_new_tokens, mcfg.block_size)
            if note:
                say(f"(note: {note})")
    return 0
