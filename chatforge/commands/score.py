"""``chatforge score``: score responses to a prompt with a reward model directory.

    chatforge score --model runs/tiny/rm --prompt "What is 2 plus 9?" --response "11." --response "Dunno."

prints a header line and, per response, the normalised score (``(raw - mean) / std`` with the
statistics stored by the rm stage), the raw score and the response, tab-separated::

    score    raw      response
    1.2034   3.1170   11.
    -0.8710  -0.4051  Dunno.

With ``--raw`` (a reward model without normalisation statistics) the score column is the raw score.
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
    print("score\traw\tresponse")
    for response, r, n in zip(args.response, raw.tolist(), norm.tolist()):
        shown = response.replace("\t", " ").replace("\r", " ").replace("\n", " ")  # one row per response
        print(f"{n:.4f}\t{r:.4f}\t{shown}")
    return 0
