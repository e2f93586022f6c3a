"""``chatforge score``: score responses to a prompt with a reward model directory.

    chatforge score --model runs/tiny/rm --prompt "What is 2 plus 9?" --response "11." --response "Dunno."

prints, per response, the normalised score (``(raw - mean) / std`` with the statistics stored by
the rm stage) and the raw score, tab-separated.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="reward model directory (a `chatforge rm` output)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--response", required=True, action="append",
                   help="an assistant answer to score (repeat the flag to score several)")
    p.add_argument("--system", default=None, help="an optional system message before the prompt")
    p.add_argument("--raw", action="store_true", help="do not require normalisation statistics (raw scores only)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    from chatforge.rl.reward import RewardModelScorer

    scorer = RewardModelScorer(args.model, args.device, normalize=not args.raw)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
        [{"role": "user", "content": args.prompt}]
    raw, norm = scorer.score_text([messages] * len(args.response), args.response)
    many = len(args.response) > 1
    for i, (r, n) in enumerate(zip(raw.tolist(), norm.tolist())):
        print(f"{n:.4f}\traw {r:.4f}" + (f"\t{args.response[i]}" if many else ""))
    return 0
