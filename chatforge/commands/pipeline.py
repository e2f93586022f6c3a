"""``chatforge pipeline``: every stage of a recipe into one run directory (see chatforge/pipeline.py).

    chatforge pipeline --config configs/tiny.yaml --out runs/tiny
    chatforge pipeline --config configs/tiny.yaml --out runs/tiny --force ppo --stages.ppo.rl.kl_coef=0.2
    chatforge pipeline --config configs/recipe.yaml --out runs/my --stages.sft.data.path=demos.jsonl ...

Finished stages are skipped, an interrupted one resumes, a stage whose inputs changed reruns (and so do the
stages after it). Ends by printing the report's summary table and where the report is; or, when the recipe
waits for people to rank answers, by saying what to do next (exit status 3).
"""

from __future__ import annotations

import argparse


def _names(values: list[str] | None) -> list[str]:
    return [n.strip() for v in values or [] for n in v.split(",") if n.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="preset YAML holding every stage (configs/tiny.yaml)")
    p.add_argument("--out", required=True, help="run directory (data/ tokenizer/ base/ sft/ rm/ ppo/ ...)")
    p.add_argument("--stages", action="append", help="comma list of steps to run (base|pretrain, sft, rm, ppo, "
                   "dpo, grpo, pairs, eval, report); their prerequisites data/tokenizer/pairs run when needed")
    p.add_argument("--force", action="append", help="rerun this step (comma list or repeated) and every step "
                   "downstream of it")
    p.add_argument("--device", default="cpu", help="device of the pipeline's own generation (eval, pair sampling)")
    p.add_argument("--quiet", action="store_true", help="only the final table")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    from chatforge.config import parse_overrides
    from chatforge.pipeline import EXIT_WAITING, Pipeline
    from chatforge.report import summary_markdown

    pipe = Pipeline(args.config, args.out, parse_overrides(rest), _names(args.stages), _names(args.force),
                    verbose=not args.quiet, device=args.device)
    results = pipe.run()
    if pipe.waiting:
        print()
        print(pipe.waiting)
        return EXIT_WAITING
    if "report" in results:
        print()
        print(summary_markdown(pipe.root))
        print(f"\nreport: {results['report'].detail['report']}")
    return 0
