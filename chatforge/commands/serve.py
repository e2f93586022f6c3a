"""``chatforge serve --model DIR [--model DIR ...]``: an OpenAI-compatible server with continuous batching.

    chatforge serve --model runs/tiny/sft --model runs/tiny/rm          # http://127.0.0.1:8000/v1
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"model": "sft", "messages": [{"role": "user", "content": "What is 2 plus 9?"}]}'

Each model is called by its directory's name (or NAME in ``--model NAME=DIR``). Causal LMs (chatforge's or
any local Hugging Face one) answer /v1/chat/completions and /v1/completions; reward models answer /v1/score.
"""

from __future__ import annotations

import argparse
import os


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="a model directory to serve, or NAME=DIR (repeat the flag to serve several)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("CHATFORGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $CHATFORGE_API_KEY, else none)")
    p.add_argument("--labels-dir", default=None, help="folder where the labelling page appends rankings and answers")
    p.add_argument("--candidates", default=None, help="a candidates file (prompts with answers) for the labelling page")
    p.add_argument("--prompts", default=None, help="a prompts file the labelling page samples answers for")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda'")
    p.add_argument("--max-batch", type=int, default=32, help="most requests decoded together per model")
    p.add_argument("--cache-len", type=int, default=None,
                   help="KV-cache slots per request (default: the model's context + a quarter)")
    p.add_argument("--max-prefill-tokens", type=int, default=4096, help="most prompt tokens prefilled in one step")
    p.add_argument("--trust-remote-code", action="store_true", help="let transformers run a model's own code")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def main(args: argparse.Namespace, rest: list[str]) -> int:
    import uvicorn

    from chatforge.serve.app import create_app
    from chatforge.serve.models import SchedulerSettings

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    settings = SchedulerSettings(max_batch=args.max_batch, cache_len=args.cache_len,
                                 max_prefill_tokens=args.max_prefill_tokens)
    app = create_app(args.model, api_key=args.api_key, labels_dir=args.labels_dir, candidates=args.candidates,
                     prompts=args.prompts, device=args.device, settings=settings,
                     trust_remote_code=args.trust_remote_code)
    ctx = app.state.ctx
    for m in ctx.models.values():
        print(f"serving '{m.name}' ({m.kind}, context {m.context_length}) from {m.path}", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use the models",
              flush=True)
    print(f"OpenAI-compatible API at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
