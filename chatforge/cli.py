"""The ``chatforge`` command line: one sub-command per stage, plus tools around them.

Stage commands take ``--config PRESET.yaml --out DIR`` and dotted overrides that keep the
config's field names (``--optim.lr=3e-4 --train.max_steps=100``).

Library code raises; only this module turns exceptions into exit codes. A user error (a
``chatforge.errors.ChatforgeError``, or a missing file or folder) prints one line on stderr and exits 2
(130 for an interrupted run); anything else is a bug and keeps its traceback. ``--debug`` (or
``CHATFORGE_DEBUG=1``) prints the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

STAGE_COMMANDS = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")
STAGE_HELP = {
    "pretrain": "pretrain a base language model on raw text",
    "sft": "supervised fine-tuning of a language model on conversations",
    "rm": "train a reward model on preference pairs",
    "ppo": "RLHF: PPO of a language model against a reward model",
    "dpo": "direct preference optimisation on preference pairs (no reward model)",
    "grpo": "critic-free RL: GRPO, or RLOO with --rl.algo=rloo",
}
TOOL_COMMANDS = (  # (name, one-line help): chatforge/commands/<name>.py with add_arguments(p) and main(args, rest)
    ("pipeline", "run every stage into a run directory"),
    ("chat", "chat in the terminal"),
    ("score", "score responses with a reward model"),
    ("report", "rebuild a run's report card"),
    ("serve", "serve models over an OpenAI-compatible API, with a web chat and a labelling page"),
    ("export", "write TensorBoard event files from a run's metrics.jsonl"),
    ("eval", "evaluate a model with lm-evaluation-harness tasks"),
    ("compare", "win rate of one model against another on your prompts"),
)
TAKES_OVERRIDES = STAGE_COMMANDS + ("pipeline",)
"""Commands whose extra ``--section.key=value`` words are config overrides."""

USER_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
"""OS errors about a path the user gave: one line, like a ChatforgeError."""


def _tokenizer(args: argparse.Namespace, rest: list[str]) -> int:
    from chatforge.data.sources import corpus_files, tokenizer_sample
    from chatforge.tokenizer import train_tokenizer

    tok = train_tokenizer(tokenizer_sample(corpus_files(args.data), args.sample_chars), args.vocab_size)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size} tokens written to {args.out}")
    return 0


def _sample(args: argparse.Namespace, rest: list[str]) -> int:
    import torch

    from chatforge.commands.chat import stop_note
    from chatforge.engine import Engine
    from chatforge.model.load import load_causal_lm
    from chatforge.tokenizer import render_prompt

    model, mcfg, tok = load_causal_lm(args.model)
    model.eval()
    if args.chat is not None:
        prompt = render_prompt(tok, [{"role": "user", "content": args.chat}])
        stop = [tok.end_id]
    else:
        prompt = [tok.bos_id] + tok.encode(args.prompt or "")
        stop = [tok.bos_id] if args.stop_at_eot else []
    limit = mcfg.block_size - 1  # at least one token of room to answer
    if len(prompt) > limit:
        print(f"note: the input is {len(prompt)} tokens, longer than the model's context of {mcfg.block_size}; "
              f"only its last {limit} tokens are used", file=sys.stderr)
        prompt = prompt[-limit:]
    gen = torch.Generator().manual_seed(args.seed)
    res = Engine(model).generate([prompt] * args.num_samples, args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, stop_ids=stop, pad_id=tok.pad_id, generator=gen)
    for i, ids in enumerate(res.tokens):
        text = tok.decode([t for t in ids if t not in stop])
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(text if args.chat is not None else (args.prompt or "") + text)
        note = stop_note(len(prompt), ids, stop, args.max_new_tokens, mcfg.block_size)
        if note:
            print(f"note: {note}", file=sys.stderr)
    return 0


def _add_debug(p: argparse.ArgumentParser, default=argparse.SUPPRESS) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="print the full traceback of any error (also: CHATFORGE_DEBUG=1)")


def build_parser() -> argparse.ArgumentParser:
    from chatforge.commands import stage, stage_help

    p = argparse.ArgumentParser(prog="chatforge", description="Train a chat model the way ChatGPT was trained: "
                                "pretrain, sft, rm, ppo (also dpo, grpo), and the tools around them.",
                                epilog="Run `chatforge COMMAND --help` for a command's options; a stage's help lists "
                                       "its config sections and main fields.")
    _add_debug(p, default=False)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    p.subparsers = {}  # name -> its parser, for errors found after parsing
    for name in STAGE_COMMANDS:
        s = sub.add_parser(name, help=STAGE_HELP[name], formatter_class=argparse.RawDescriptionHelpFormatter,
                           description=f"{STAGE_HELP[name][0].upper()}{STAGE_HELP[name][1:]}; extra --section.key=value "
                                       "words override the config.",
                           epilog=stage_help.epilog(name))
        stage.add_arguments(s)
        s.set_defaults(fn=stage.main)
        p.subparsers[name] = s
    t = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    t.add_argument("--data", nargs="+", required=True, help="text files or folders")
    t.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size; 0 = bytes only")
    t.add_argument("--sample-chars", type=int, default=200_000_000,
                   help="learn the merges from a bounded, repeatable sample of this many characters of the corpus")
    t.add_argument("--out", required=True)
    t.set_defaults(fn=_tokenizer)
    p.subparsers["tokenizer"] = t
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
    p.subparsers["sample"] = s
    for name, help_ in TOOL_COMMANDS:
        try:
            mod = importlib.import_module(f"chatforge.commands.{name}")
        except ModuleNotFoundError:
            continue
        s = sub.add_parser(name, help=help_, description=help_)
        mod.add_arguments(s)
        s.set_defaults(fn=lambda a, rest, m=mod: m.main(a, rest))
        p.subparsers[name] = s
    for s in p.subparsers.values():
        _add_debug(s)
    return p


def run(args: argparse.Namespace, rest: list[str], debug: bool) -> int:
    """Run a parsed command; user errors become one line and an exit code, bugs keep their traceback."""
    from chatforge.errors import ChatforgeError

    try:
        return args.fn(args, rest) or 0
    except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and raises Interrupted instead)
        if debug:
            traceback.print_exc()
        print("chatforge: interrupted", file=sys.stderr)
        return 130
    except (ChatforgeError, *USER_PATH_ERRORS) as e:
        if debug:
            traceback.print_exc()
        code = getattr(e, "exit_code", 2)
        print(f"{'chatforge' if code == 130 else 'error'}: {e}", file=sys.stderr)
        return code
    finally:
        if "torch" in sys.modules:  # a process group exists only if torch was imported
            from chatforge.distributed import shutdown

            shutdown()


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help()
        sys.exit(0)
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        parser.error("name a command (chatforge --help lists them)")
    sub = parser.subparsers[args.command]
    if rest and args.command not in TAKES_OVERRIDES:
        sub.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command in STAGE_COMMANDS and not args.print_config and not args.out:
        sub.error("the following arguments are required: --out (or --print-config)")
    debug = args.debug or os.environ.get("CHATFORGE_DEBUG", "") not in ("", "0")
    sys.exit(run(args, rest, debug))


if __name__ == "__main__":
    main()
