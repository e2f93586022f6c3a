"""``chatforge chat --model DIR``: a terminal chat with streamed tokens.

The conversation so far is rendered in the chat format each turn (tokenizer.render_prompt), so the model sees
the whole history (the oldest turns are dropped when it outgrows the context). ``/reset`` starts over,
``/quit`` (or end of input) leaves. With piped input (not a terminal) each line is one user turn and only the
answers are printed, one per line.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a causal LM model directory (base/, sft/, ppo/, ...)")
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
    if interactive:
        print(f"chatforge chat with {args.model} — /reset to start over, /quit to leave")
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/reset":
            history = []
            if interactive:
                print("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        ids = fit_history(tok, system, history, mcfg.block_size, min(args.max_new_tokens, mcfg.block_size // 2))
        if interactive:
            print("bot> ", end="", flush=True)
        out: list[int] = []
        shown = ""

        def visible(text: str) -> str:  # piped: one answer per output line
            return text if interactive else text.replace("\r", " ").replace("\n", " ")

        for t in engine.stream(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, stop_ids=stop, generator=gen):
            if t in stop:
                break
            out.append(t)
            text = tok.decode(out, skip_special=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(visible(text[len(shown):]), end="", flush=True)
                shown = text
        answer = tok.decode(out, skip_special=True).strip()
        print(visible(tok.decode(out, skip_special=True)[len(shown):]), flush=True)
        history.append({"role": "assistant", "content": answer or "..."})
    return 0
