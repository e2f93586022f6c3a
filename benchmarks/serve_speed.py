"""Serving throughput: `chatforge serve` with continuous batching vs one request at a time, and the same
requests through `transformers`' own batched `generate`.

    python benchmarks/serve_speed.py --model runs/tiny/sft --prompts runs/tiny/data/eval_prompts.jsonl

Each serving mode starts `chatforge serve` in a subprocess on 127.0.0.1 (a free port) and runs ``--clients``
concurrent streaming clients (plain asyncio HTTP/1.1 sockets reading server-sent events), each sending
``--requests-per-client`` chat requests one after the other (greedy, ``--max-tokens`` new tokens at most). Reported per mode: generated tokens/s over
the whole run (every client's tokens / wall time), time to first token (first content chunk) p50/p95, and
whether every answer equals the one-at-a-time answer. Each mode runs ``--repeats`` times; the median run
is shown (the development machine is shared, so single runs vary).

- ``batched``: the server as shipped (``--max-batch`` = clients): one decode step over all active requests.
- ``one-at-a-time``: the same server with ``--max-batch 1``: requests are served one after another.
- ``hf-generate``: transformers ``AutoModelForCausalLM.generate`` on the same prompts, in batches of
  ``--clients`` (left-padded, greedy, KV cache), in this process, no HTTP: tokens up to each row's end token.
- ``scheduler``: chatforge's Scheduler in this process, no HTTP: what the HTTP/SSE layer costs.

Also printed: the KV-cache memory one active request holds. Loops are bounded by count and by
``--time-limit`` seconds per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, machine_info, print_table, set_threads, write_json

FALLBACK_PROMPTS = ["Hello! What is 2 plus 9?", "Can you name an animal other than dog?", "Wave goodbye to Ines.",
                    "What do you get if you take 6 from 6?"]


def read_questions(path: str | None, n: int) -> list[str]:
    qs: list[str] = []
    if path:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                rec = json.loads(line)
                qs.append(rec["prompt"] if isinstance(rec, dict) else str(rec))
    qs = qs or FALLBACK_PROMPTS
    return [qs[i % len(qs)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


class Server:
    """`chatforge serve` in a subprocess, stopped by pid."""

    def __init__(self, model: str, max_batch: int, threads: int):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
        self.proc = subprocess.Popen([sys.executable, "-m", "chatforge", "serve", "--model", f"bench={model}",
                                      "--port", str(self.port), "--max-batch", str(max_batch), "--log-level",
                                      "warning"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the server did not start within 180 s")
            time.sleep(0.3)

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


async def one_request(port: int, question: str, max_tokens: int) -> dict:
    """One streamed chat request over a plain asyncio socket: HTTP/1.1, chunked transfer, server-sent events.
    (A small client on purpose: on a 2-core machine a full client library spends more CPU than the server.)"""
    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": question}], "temperature": 0,
                       "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}).encode()
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP error: {status!r} {await reader.read()!r}")
    while (await reader.readline()) not in (b"\r\n", b""):  # headers (the body is chunked)
        pass
    ttft, text, usage, buf = None, "", None, b""
    while True:
        size = int((await reader.readline()).strip() or b"0", 16)
        if size == 0:
            break
        buf += await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk
        *events, buf = buf.split(b"\n\n")
        for ev in events:
            data = ev.decode()[len("data: "):]
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                piece = c["delta"].get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text += piece
    writer.close()
    return {"ttft": ttft, "text": text, "tokens": usage["completion_tokens"], "latency": time.perf_counter() - t0}


async def run_clients(port: int, questions: list[list[str]], max_tokens: int, time_limit: float) -> dict:
    results: dict[tuple[int, int], dict] = {}
    await one_request(port, questions[0][0], 4)  # warm-up (not counted)
    t0 = time.perf_counter()
    deadline = t0 + time_limit

    async def client(i: int) -> None:
        for j, q in enumerate(questions[i]):
            if time.perf_counter() > deadline:
                return
            results[(i, j)] = await one_request(port, q, max_tokens)

    await asyncio.gather(*(client(i) for i in range(len(questions))))
    wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in results.values())
    ttfts = [r["ttft"] for r in results.values() if r["ttft"] is not None]
    return {"requests": len(results), "tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p95_s": percentile(ttfts, 95),
            "texts": {f"{i},{j}": r["text"] for (i, j), r in results.items()}}


def serve_mode(model: str, max_batch: int, threads: int, questions, max_tokens: int, time_limit: float) -> dict:
    server = Server(model, max_batch, threads)
    try:
        return asyncio.run(run_clients(server.port, questions, max_tokens, time_limit))
    finally:
        server.stop()


def hf_generate_mode(model_dir: str, questions: list[list[str]], max_tokens: int, time_limit: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from chatforge.model.load import load_tokenizer
    from chatforge.tokenizer import render_prompt

    tok = load_tokenizer(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stop = [tok.end_id, tok.eot_id]
    rounds = max(len(q) for q in questions)
    toks, t0 = 0, time.perf_counter()
    deadline = t0 + time_limit
    done = 0
    for j in range(rounds):
        if time.perf_counter() > deadline:
            break
        prompts = [render_prompt(tok, [{"role": "user", "content": q[j]}]) for q in questions if j < len(q)]
        P = max(map(len, prompts))
        ids = torch.full((len(prompts), P), tok.pad_id)
        mask = torch.zeros((len(prompts), P), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):], mask[i, P - len(p):] = torch.tensor(p), 1
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=stop, pad_token_id=tok.pad_id)[:, P:]
        for row in out.tolist():
            n = next((k + 1 for k, t in enumerate(row) if t in stop), len(row))
            toks += n
        done += len(prompts)
    wall = time.perf_counter() - t0
    return {"requests": done, "tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
            "ttft_p50_s": float("nan"), "ttft_p95_s": float("nan")}


def scheduler_mode(model_dir: str, questions: list[list[str]], max_tokens: int, max_batch: int) -> tuple[dict, int]:
    from chatforge.model.load import load_causal_lm
    from chatforge.scheduler import Request, Scheduler
    from chatforge.tokenizer import render_prompt

    model, cfg, tok = load_causal_lm(model_dir)
    s = Scheduler(model.eval(), max_batch=max_batch, pad_id=tok.pad_id)
    reqs = [Request(render_prompt(tok, [{"role": "user", "content": q}]), max_tokens, temperature=0.0,
                    stop_ids=[tok.end_id, tok.eot_id]) for qs in questions for q in qs]
    t0 = time.perf_counter()
    hs = [s.submit(r) for r in reqs]
    s.run_until_idle()
    wall = time.perf_counter() - t0
    toks = sum(len(h.tokens) for h in hs)
    return ({"requests": len(hs), "tokens": toks, "wall_s": wall, "tokens_per_s": toks / wall,
             "ttft_p50_s": float("nan"), "ttft_p95_s": float("nan")}, s.kv_bytes_per_request())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT.parent.parent / "runs" / "tiny" / "sft"),
                    help="a chat model directory (the demo's sft/)")
    ap.add_argument("--prompts", default=None, help="prompts file (JSON lines with 'prompt'); default: a few built in")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the server (0 = one per core)")
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per mode before clients stop")
    ap.add_argument("--modes", default="batched,one-at-a-time,hf-generate,scheduler")
    ap.add_argument("--repeats", type=int, default=3, help="runs per mode; the median run (by tokens/s) is shown")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = set_threads(args.threads)
    flat = read_questions(args.prompts, args.clients * args.requests_per_client)
    questions = [flat[i * args.requests_per_client:(i + 1) * args.requests_per_client] for i in range(args.clients)]
    modes = args.modes.split(",")
    rows, results = [], {}
    kv = None
    for mode in modes:
        runs = []
        for rep in range(args.repeats):
            print(f"running {mode} ({rep + 1}/{args.repeats}) ...", flush=True)
            if mode == "batched":
                r = serve_mode(args.model, args.clients, threads, questions, args.max_tokens, args.time_limit)
            elif mode == "one-at-a-time":
                r = serve_mode(args.model, 1, threads, questions, args.max_tokens, args.time_limit)
            elif mode == "hf-generate":
                r = hf_generate_mode(args.model, questions, args.max_tokens, args.time_limit)
            elif mode == "scheduler":
                r, kv = scheduler_mode(args.model, questions, args.max_tokens, args.clients)
            else:
                raise SystemExit(f"unknown mode {mode}")
            runs.append(r)
        runs.sort(key=lambda r: r["tokens_per_s"])
        results[mode] = {**runs[len(runs) // 2], "tokens_per_s_all": [r["tokens_per_s"] for r in runs]}
    base = results.get("one-at-a-time", {}).get("tokens_per_s")
    for mode in modes:
        r = results[mode]
        rows.append({"mode": mode, "requests": r["requests"], "tokens": r["tokens"], "wall s": r["wall_s"],
                     "runs tokens/s": " / ".join(f"{x:.0f}" for x in r["tokens_per_s_all"]),
                     "tokens/s": r["tokens_per_s"], "x one-at-a-time": r["tokens_per_s"] / base if base else "n/a",
                     "TTFT p50 s": r["ttft_p50_s"], "TTFT p95 s": r["ttft_p95_s"]})
    if "batched" in results and "one-at-a-time" in results:
        a, b = results["batched"]["texts"], results["one-at-a-time"]["texts"]
        same = sum(a[k] == b.get(k) for k in a)
        print(f"answers identical to one-at-a-time serving: {same}/{len(a)}")
    if kv is None:
        from chatforge.model.load import load_causal_lm
        from chatforge.scheduler import Scheduler

        kv = Scheduler(load_causal_lm(args.model)[0], max_batch=1).kv_bytes_per_request()
    info = machine_info()
    print_table(rows, ["mode", "requests", "tokens", "wall s", "tokens/s", "runs tokens/s", "x one-at-a-time",
                       "TTFT p50 s", "TTFT p95 s"],
                f"serving {args.model}: {args.clients} clients x {args.requests_per_client} requests, greedy, "
                f"<= {args.max_tokens} new tokens; {info['cpu']}, {threads} threads")
    if kv is not None:
        print(f"KV cache per active request: {kv / 1024:.0f} KiB (keys + values, every layer, the context + a "
              f"quarter of slots, fp32)")
    for r in results.values():
        r.pop("texts", None)
    write_json(args.json, {"machine": info, "args": vars(args), "results": results, "kv_bytes_per_request": kv})


if __name__ == "__main__":
    main()
