"""``chatforge compare A_DIR B_DIR --prompts FILE --judge RM_DIR|module:function``: A's win rate against B.

Writes ``OUT/compare.jsonl`` (per prompt: both answers, both scores, the outcome), ``OUT/compare.md`` (the
summary and the answers side by side) and ``OUT/summary.json``; ``--alpaca-eval FILE.json`` also exports the
answers in AlpacaEval's format (``instruction``, ``output``, ``generator``): A's to FILE.json, B's to
FILE_reference.json, for judging with a hosted model elsewhere.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_a", help="model directory A (its win rate is reported)")
    p.add_argument("model_b", help="model directory B (the baseline)")
    p.add_argument("--prompts", required=True, nargs="+", help="prompt files (JSONL: strings, {prompt} or {messages})")
    p.add_argument("--judge", required=True, help="a reward model directory, or module:function scoring (prompt, response)")
    p.add_argument("--out", help="output folder (default compare-A-vs-B)")
    p.add_argument("--names", help="generator names A,B (default the directory names)")
    p.add_argument("--alpaca-eval", metavar="FILE.json", help="also export the answers in AlpacaEval's format")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def _names(args: argparse.Namespace) -> tuple[str, str]:
    if args.names:
        parts = [x.strip() for x in args.names.split(",")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"--names expects two names 'A,B', got {args.names!r}")
        return parts[0], parts[1]
    a, b = Path(args.model_a).resolve(), Path(args.model_b).resolve()
    if a.name != b.name:
        return a.name, b.name
    return f"{a.parent.name}/{a.name}", f"{b.parent.name}/{b.name}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    from chatforge.checkpoint import atomic_write_text
    from chatforge.compare import answers, judge_scores, outcomes, prompt_text, win_rate
    from chatforge.data.prompts import read_prompts

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    records = read_prompts(args.prompts)[: args.limit]
    prompts, sources = [p.messages for p in records], [p.source for p in records]
    name_a, name_b = _names(args)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
               batch_size=args.batch_size, device=args.device, sources=sources)
    ans_a, ans_b = answers(args.model_a, prompts, **gen), answers(args.model_b, prompts, **gen)
    sa = judge_scores(args.judge, prompts, ans_a, args.device)
    sb = judge_scores(args.judge, prompts, ans_b, args.device)
    res = outcomes(sa, sb)
    summary = {"a": str(args.model_a), "b": str(args.model_b), "name_a": name_a, "name_b": name_b,
               "judge": args.judge, "prompts": [str(p) for p in args.prompts],
               "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, **win_rate(res)}

    out = Path(args.out or f"compare-{name_a.replace('/', '_')}-vs-{name_b.replace('/', '_')}")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"source": s, "prompt": prompt_text(m), "a": x, "b": y, "score_a": u, "score_b": v, "outcome": o}
            for s, m, x, y, u, v, o in zip(sources, prompts, ans_a, ans_b, sa, sb, res)]
    atomic_write_text(out / "compare.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    line = (f"{name_a} vs {name_b} on {summary['n']} prompts, judge {args.judge}: win rate "
            f"{summary['win_rate']:.3f} [{summary['ci_low']:.3f}, {summary['ci_high']:.3f}] ({summary['interval']}); "
            f"{summary['wins']} wins, {summary['ties']} ties, {summary['losses']} losses")
    md = [f"# {name_a} vs {name_b}", "", line, "", f"| prompt | {name_a} | {name_b} | score A | score B | outcome |",
          "|---|---|---|---:|---:|---:|"]
    md += [f"| {_cell(r['prompt'])} | {_cell(r['a'])} | {_cell(r['b'])} | {r['score_a']:.4g} | {r['score_b']:.4g} | "
           f"{r['outcome']:g} |" for r in rows]
    atomic_write_text(out / "compare.md", "\n".join(md) + "\n")
    if args.alpaca_eval:
        f = Path(args.alpaca_eval)
        ref = f.with_name(f.stem + "_reference" + (f.suffix or ".json"))
        for path, ans, name in ((f, ans_a, name_a), (ref, ans_b, name_b)):
            data = [{"instruction": r["prompt"], "output": x, "generator": name} for r, x in zip(rows, ans)]
            atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        print(f"AlpacaEval: {f} ({name_a}), {ref} ({name_b}): alpaca_eval --model_outputs {f} --reference_outputs {ref}")
    print(line)
    print(f"answers side by side: {out / 'compare.md'} and {out / 'compare.jsonl'}")
    return 0
