"""The ``chatforge`` command line: one sub-command per stage, plus tools around them.

Stage commands take ``--config PRESET.yaml --out DIR`` and dotted overrides that keep the
config's field names (``--optim.lr=3e-4 --train.max_steps=100``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

STAGE_COMMANDS = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")


def _stage(args: argparse.Namespace, rest: list[str]) -> int:
    from chatforge.config import load_config, parse_overrides

    cfg = load_config(args.command, args.config, parse_overrides(rest))
    module = importlib.import_module(f"chatforge.stages.{args.command}")
    module.run(cfg, args.out)
    return 0


def _tokenizer(args: argparse.Namespace, rest: list[str]) -> int:
    from chatforge.data.pretrain import corpus_files, iter_documents
    from chatforge.tokenizer import train_tokenizer

    tok = train_tokenizer(iter_documents(corpus_files(args.data)), args.vocab_size)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} tokens written to {args.out}")
    return 0


def _sample(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from chatforge.engine import Engine
    from chatforge.model.load import load_causal_lm
    from chatforge.tokenizer import render_prompt

    model, _, tok = load_causal_lm(args.model)
    model.eval()
    if args.chat is not None:
        prompt = render_prompt(tok, [{"role": "user", "content": args.chat}])
        stop = [tok.end_id]
    else:
        prompt = [tok.bos_id] + tok.encode(args.prompt or "")
        stop = [tok.bos_id] if args.stop_at_eot else []
    gen = torch.Generator().manual_seed(args.seed)
    res = Engine(model).generate([prompt] * args.num_samples, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, stop_ids=stop, pad_id=tok.pad_id, generator=gen)
    for i, ids in enumerate(res.tokens):
        text = tok.decode([t for t in ids if t not in stop])
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text if args.chat is not None else (args.prompt or "") + text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatforge", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in STAGE_COMMANDS:
        s = sub.add_parser(name, help=f"run the {name} stage", description=f"Run the {name} stage; extra --section.key=value words override the config.")
        s.add_argument("--config", help="preset YAML (configs/*.yaml)")
        s.add_argument("--out", required=True, help="output model directory (resumed when it holds a checkpoint)")
        s.set_defaults(fn=_stage)
    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    t.add_argument("--data", nargs="+", required=True, help="text files or folders")
    t.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size; 0 = bytes only")
    t.add_argument("--out", required=True)
    t.set_defaults(fn=_tokenizer)
    s = sub.add_parser("sample", help="generate text from a model directory")
    s.add_argument("--model", required=True)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--prompt", help="raw text to continue")
    g.add_argument("--chat", help="a user message, answered in the chat format")
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--stop-at-eot", action="store_true", help="stop raw sampling at the end of a document")
    s.set_defaults(fn=_sample)
    for name, help_ in (("pipeline", "run every stage into a run directory"), ("chat", "chat in the terminal"),
                        ("score", "score a response with a reward model"), ("report", "rebuild a run's report card"),
                        ("export", "write TensorBoard event files from a run's metrics.jsonl"),
                        ("eval", "evaluate a model with lm-evaluation-harness tasks"),
                        ("compare", "win rate of one model against another on your prompts")):
        try:
            mod = importlib.import_module(f"chatforge.commands.{name}")
        except ModuleNotFoundError:
            continue
        s = sub.add_parser(name, help=help_)
        mod.add_arguments(s)
        s.set_defaults(fn=lambda a, rest, m=mod: m.main(a, rest))
    return p


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in STAGE_COMMANDS + ("pipeline",):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from chatforge.config import ConfigError
    from chatforge.data.records import DataError
    from chatforge.trainer import Interrupted, TrainingError

    try:
        code = args.fn(args, rest)
    except Interrupted as e:
        print(f"chatforge: {e}", file=sys.stderr)
        code = 130
    except (ConfigError, DataError, TrainingError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    finally:
        from chatforge.distributed import shutdown

        shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
