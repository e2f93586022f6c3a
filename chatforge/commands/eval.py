"""``chatforge eval --model DIR --tasks T1,T2``: lm-evaluation-harness on a model directory, in-process.

Results go to ``DIR/lm_eval.json`` (or ``--output``) and a table on screen. chatforge's own tasks
(``chatforge_sst2``, ``chatforge_wikitext2``) read the public data in ``../shared/data`` (``--data-dir``
or $CHATFORGE_SHARED_DATA to point elsewhere); ``--include-path`` adds folders of any lm-eval task YAMLs.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model directory (chatforge output or local Hugging Face causal LM)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (e.g. chatforge_sst2,chatforge_wikitext2)")
    p.add_argument("--include-path", action="append", default=[], help="a folder of lm-eval task YAMLs (repeatable)")
    p.add_argument("--data-dir", help="folder of the public data the chatforge tasks read (default ../shared/data "
                                      "beside the repository, or $CHATFORGE_SHARED_DATA)")
    p.add_argument("--apply-chat-template", action="store_true", help="render prompts with the model's chat template")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1; for quick checks)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'")
    p.add_argument("--output", help="results JSON (default MODEL/lm_eval.json; results of other tasks there are kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default; 1 is fastest "
                                                          "for small models on a busy machine)")
    p.add_argument("--trust-remote-code", action="store_true")


def main(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ValueError("chatforge eval needs lm-evaluation-harness: pip install 'chatforge[eval]' "
                         "(or pip install lm-eval)") from None
    from chatforge.lm_eval.run import evaluate_model, results_table

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    res = evaluate_model(args.model, tasks, include_paths=args.include_path, device=args.device,
                         batch_size=args.batch_size, limit=args.limit, num_fewshot=args.num_fewshot,
                         apply_chat_template=args.apply_chat_template, data_dir=args.data_dir,
                         output=args.output, trust_remote_code=args.trust_remote_code, seed=args.seed)
    print(results_table(res))
    print(f"results: {res['output_file']}")
    return 0
