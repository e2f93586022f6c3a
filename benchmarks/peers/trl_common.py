"""What the chatforge-vs-TRL stage benchmarks share (sft/rm/dpo/grpo/ppo_speed.py).

* **Models.** One tokenizer (a chatforge byte-level BPE, 2,048 ids, trained on the shared SFT,
  preference and prompt texts) and, per size, one randomly initialised native chatforge Llama saved
  as a Hugging Face directory (``policy/``) plus a reward-model directory on the same trunk
  (``rm/``: ``LlamaForSequenceClassification``, ``reward_norm`` mean 0 std 1). chatforge loads them
  with ``load_causal_lm``/``load_scalar_model``; TRL loads the *same files* with
  ``AutoModelForCausalLM``/``AutoModelForSequenceClassification`` (``LlamaForCausalLM``, SDPA), so
  both sides train identical weights of identical shape. (The issues' TRL reference figures used a
  GPT-2-config model; ours is Llama on both sides.)
* **Processes.** Every measured loop runs in its own subprocess (``--child``) that reports its
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` at exit: peak resident memory of that run alone
  (Python, torch, transformers/TRL imports included).
* **Timing.** chatforge: the stage's own ``run(cfg, out)`` (the code a user runs), timed by the
  Trainer's per-step ``step_s`` in metrics.jsonl (``train.log_every=1``); set-up (data reading,
  tokenisation, model loading) and the final save are reported apart. TRL: ``trainer.train()`` with a
  callback stamping ``on_step_end``; a step is the time between consecutive stamps (data collation
  included), the first one from ``on_train_begin``. Set-up (dataset tokenisation, model loading, trainer
  construction) reported apart. Warmup steps are excluded on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("CHATFORGE_SHARED_DATA", ROOT.parent / "shared" / "data"))  # as tests/conftest.py
SFT_DATA = DATA / "sft" / "alpaca_en_demo.json"
PREF_DATA = DATA / "preference" / "hh_rlhf_harmless_base_test.jsonl.gz"
PROMPT_DATA = DATA / "prompts" / "oasst_prompt_lottery_en_250_text.jsonl"

VOCAB = 2048
SIZES = {
    # nanoGPT's CPU shape (the issues' reference size): ~1.1M parameters with the 2,048-id vocabulary
    "small": dict(n_layer=4, n_head=4, n_embd=128),
    # ~11.5M parameters
    "medium": dict(n_layer=6, n_head=6, n_embd=384),
}

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------ models


def prepare_models(work: Path, sizes: list[str], block_size: int) -> dict[str, dict[str, str]]:
    """Tokenizer + per size a policy dir and an RM dir under ``work`` (reused when present)."""
    import torch

    from chatforge.config import ModelConfig
    from chatforge.model.gpt import GPT
    from chatforge.model.heads import ScalarModel
    from chatforge.model.save import save_model_dir

    work.mkdir(parents=True, exist_ok=True)
    tok = None
    dirs = {}
    for size in sizes:
        d = work / f"{size}_T{block_size}"
        pol, rm = d / "policy", d / "rm"
        dirs[size] = {"policy": str(pol), "rm": str(rm)}
        if (rm / "chatforge.json").is_file():
            continue
        tok = tok or make_tokenizer(work)
        cfg = ModelConfig(**SIZES[size], block_size=block_size)
        torch.manual_seed(0)
        model = GPT(cfg, tok.vocab_size)
        save_model_dir(model, pol, cfg, tok)
        torch.manual_seed(1)
        scalar = ScalarModel.from_trunk(model, score_std=None)
        save_model_dir(scalar, rm, cfg, tok)
        (rm / "chatforge.json").write_text(json.dumps({"stage": "rm", "reward_norm": {"mean": 0.0, "std": 1.0, "n": 0}}))
    return dirs


def make_tokenizer(work: Path):
    """A 2,048-id chatforge BPE trained on the benchmark texts (cached in ``work/tokenizer``)."""
    from chatforge.data.conversations import read_conversations
    from chatforge.data.preferences import read_preferences
    from chatforge.model.load import load_tokenizer
    from chatforge.tokenizer import train_tokenizer

    d = work / "tokenizer"
    if (d / "tokenizer.json").is_file():
        return load_tokenizer(d)
    texts = []
    for c in read_conversations([str(SFT_DATA)], strict=False):
        texts += [m["content"] for m in c.messages]
    for p in read_preferences([str(PREF_DATA)], strict=False):
        texts += [m["content"] for m in p.prompt] + [p.chosen, p.rejected]
    for line in PROMPT_DATA.read_text().splitlines():
        texts.append(str(json.loads(line)))
    tok = train_tokenizer(texts, VOCAB, show_progress=False)
    tok.save(d)
    return tok


# ------------------------------------------------------------------------------------------ data


def sft_messages(limit: int = 0) -> list[list[dict]]:
    """The SFT conversations as chatforge reads them (the same messages go to TRL)."""
    from chatforge.data.conversations import read_conversations

    convs = [c.messages for c in read_conversations([str(SFT_DATA)], strict=False)]
    return convs[:limit] if limit else convs


def preference_records(tok, block_size: int, limit: int = 0) -> tuple[list[dict], int]:
    """TRL's conversational preference records of the pairs chatforge keeps at this context, among the first
    ``limit`` (0 = all) readable pairs
    (chatforge drops pairs longer than the context; the same pairs go to TRL): ({prompt, chosen,
    rejected} message lists, number dropped as overlong)."""
    from chatforge.data.pairs import tokenize_pair
    from chatforge.data.preferences import read_preferences

    out, dropped = [], 0
    pairs = list(read_preferences([str(PREF_DATA)], strict=False))
    for p in pairs[:limit] if limit else pairs:  # the first `limit` pairs, as chatforge's data.max_examples
        if tokenize_pair(tok, p).length > block_size:
            dropped += 1
            continue
        out.append({"prompt": list(p.prompt), "chosen": [{"role": "assistant", "content": p.chosen}],
                    "rejected": [{"role": "assistant", "content": p.rejected}]})
    return out, dropped


def prompt_messages(tok, block_size: int, max_new_tokens: int) -> list[list[dict]]:
    """The RL prompts (JSON string lines) as user messages, those that fit block_size - max_new_tokens."""
    from chatforge.data.prompts import read_prompts
    from chatforge.tokenizer import render_prompt

    out = []
    for p in read_prompts([str(PROMPT_DATA)], strict=False):
        if len(render_prompt(tok, p.messages)) <= block_size - max_new_tokens:
            out.append(list(p.messages))
    return out


# ------------------------------------------------------------------------------------------ chatforge


def run_chatforge_stage(stage: str, overrides: list[str], warmup: int, threads: int) -> dict:
    """Run ``chatforge.stages.<stage>.run`` in this process; per-step seconds from metrics.jsonl."""
    import importlib

    from chatforge.config import load_config
    from chatforge.metrics import read_metrics

    common = [f"train.threads={threads}", "train.device=cpu", "train.dtype=fp32", "train.eval_every=0",
              "train.ckpt_every=0", "train.log_every=1", "train.progress=false", "optim.warmup_steps=1",
              "data.val_fraction=0.0"]
    cfg = load_config(stage, None, common + overrides)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        importlib.import_module(f"chatforge.stages.{stage}").run(cfg, out)
        wall = time.perf_counter() - t0
        rows = [r for r in read_metrics(out) if r.get("kind") == "train"]
    step_s = [r["step_s"] for r in rows]
    return {"step_s": step_s[warmup:], "warmup_s": sum(step_s[:warmup]), "setup_s": wall - sum(step_s),
            "rows": rows[warmup:]}


# ------------------------------------------------------------------------------------------ TRL


def trl_args(cls, out: str, batch: int, steps: int, **kw):
    """A TRL config with the settings every benchmark shares (CPU, fp32, no logging/saving/eval)."""
    return cls(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4,
               lr_scheduler_type="constant", logging_steps=10**6, save_strategy="no", eval_strategy="no",
               report_to=[], use_cpu=True, bf16=False, fp16=False, dataloader_num_workers=0,
               disable_tqdm=True, seed=1337, **kw)


def timing_callback():
    """A TrainerCallback stamping the train start and every step end (perf_counter)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t_begin, self.stamps, self.tokens = None, [], []

        def on_train_begin(self, args, state, control, **kw):
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.stamps.append(time.perf_counter())
            self.tokens.append(getattr(state, "num_input_tokens_seen", 0) or 0)

        def steps(self, warmup: int) -> dict:
            s = [self.t_begin] + self.stamps
            d = [b - a for a, b in zip(s[:-1], s[1:])]
            return {"step_s": d[warmup:], "warmup_s": sum(d[:warmup]),
                    "tokens": (self.tokens[-1] - (self.tokens[warmup - 1] if warmup else 0)) if len(self.tokens) > warmup else 0}

    return StepTimer()


def train_timed(trainer, timer, t0: float, warmup: int) -> dict:
    """``trainer.train()``; steps after ``warmup`` timed, set-up = from ``t0`` (start of data/model
    preparation) to the train-begin callback (so TRL's work before its first step, e.g. precomputed
    reference log-probs, counts as set-up, as chatforge's does)."""
    trainer.train()
    r = timer.steps(warmup)
    r["setup_s"] = timer.t_begin - t0
    return r


class GenerateTimer:
    """Wraps ``model.generate`` (instance attribute) to time TRL's rollouts: per call, seconds and new
    token positions (rows x new columns; a row that stopped early still counts its padding)."""

    def __init__(self, model):
        self.calls: list[tuple[float, int]] = []
        self.starts: list[float] = []  # perf_counter at the start of each call
        self.active = False  # inside generate (PassTimer leaves the forwards of generation to this timer)
        orig = model.generate

        def generate(*args, **kw):
            ids = kw.get("input_ids", args[0] if args else None)
            t0 = time.perf_counter()
            self.active = True
            try:
                out = orig(*args, **kw)
            finally:
                self.active = False
            seq = out.sequences if hasattr(out, "sequences") else out
            new = seq.shape[1] - (ids.shape[1] if ids is not None else 0)
            self.calls.append((time.perf_counter() - t0, seq.shape[0] * new))
            self.starts.append(t0)
            return out

        model.generate = generate

    def after(self, warmup_calls: int) -> dict:
        c = self.calls[warmup_calls:]
        return {"gen_s": sum(s for s, _ in c), "gen_tokens": sum(n for _, n in c), "gen_calls": len(self.calls)}

    def since(self, t: float) -> float:
        """Seconds of the generate calls that started after ``t``."""
        return sum(s for (s, _), t0 in zip(self.calls, self.starts) if t0 >= t)


class PassTimer:
    """Times the no-grad forward calls (the rollout's scoring passes) of named modules, outside ``generate``:
    wraps each module's ``forward`` (instance attribute). Forwards with gradients (the update) are not
    recorded: the update is the rest of the step."""

    def __init__(self, modules: dict, gen: Optional[GenerateTimer] = None):
        import torch

        self.events: list[tuple[float, str, float]] = []  # (start, name, seconds)
        self._depth = 0
        for name, module in modules.items():
            orig = module.forward

            def forward(*args, _orig=orig, _name=name, **kw):
                if self._depth or (gen is not None and gen.active) or torch.is_grad_enabled():
                    return _orig(*args, **kw)
                self._depth += 1
                t0 = time.perf_counter()
                try:
                    return _orig(*args, **kw)
                finally:
                    self._depth -= 1
                    self.events.append((t0, _name, time.perf_counter() - t0))

            module.forward = forward

    def since(self, t: float) -> dict[str, float]:
        """Seconds per name of the calls that started after ``t``."""
        out: dict[str, float] = {}
        for t0, name, s in self.events:
            if t0 >= t:
                out[name] = out.get(name, 0.0) + s
        return out


def trl_phases(timer, gen: GenerateTimer, passes: Optional[PassTimer], warmup: int) -> dict:
    """TRL's per-phase seconds over the timed steps (after ``warmup``): generate, each named scoring pass;
    the update and everything else is step time minus those."""
    t = timer.stamps[warmup - 1] if warmup else timer.t_begin
    out = {"gen_s": gen.since(t)}
    if passes is not None:
        out.update({f"{k}_s": v for k, v in passes.since(t).items()})
    return {"phases": out}


PHASE_COLUMNS = ("gen_s", "logp_s", "ref_s", "reward_s", "value_s", "update_s")


def chatforge_phases(rows: list[dict]) -> dict:
    """chatforge's per-phase seconds summed over the timed metrics rows (chatforge/rl/timing.py)."""
    return {"phases": {k: sum(r.get(k, 0.0) for r in rows) for k in PHASE_COLUMNS if any(k in r for r in rows)}}


def print_phases(res: dict, loops, title: str) -> None:
    """Seconds per step in each phase, and the rest (step time minus the phases), for each finished loop."""
    from common import print_table

    table = []
    for name, r, total in finished_loops(res, loops):
        ph = r.get("phases")
        if not ph:
            continue
        n = len(r["step_s"])
        row = {"loop": name, "s/step": total / n}
        row.update({k[:-2]: (ph[k] / n if k in ph else float("nan")) for k in PHASE_COLUMNS})
        row["rest"] = (total - sum(ph.values())) / n
        table.append(row)
    if table:
        print_table(table, list(table[0]), title=title + " (s/step per phase; n/a = not timed or not run; "
                                                          "TRL's update is inside 'rest')")


def load_hf_tokenizer(policy_dir: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(policy_dir)
    return tok


# ------------------------------------------------------------------------------------------ harness


def finished_loops(res: dict, names):
    """(name, result, total timed seconds) of each loop in ``names`` that ran its timed steps without error."""
    for name in names:
        r = res.get(name)
        if r and not r.get("error") and r.get("step_s"):
            yield name, r, sum(r["step_s"])


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def run_loops(a: argparse.Namespace, script: str, size: str) -> dict:
    """Every loop of ``a.loops`` at ``size``, each in its own subprocess (``--child``): name -> its result dict
    (``error`` set where it failed), one progress line each."""
    res = {}
    for name in a.loops.split(","):
        cmd = [sys.executable, script, "--child", name, "--size", size, "--warmup", str(a.warmup),
               "--steps", str(a.steps), "--threads", str(a.threads), "--work", a.work,
               *[x for k, v in vars(a).items() if k.startswith("x_") for x in (f"--{k[2:].replace('_', '-')}", str(v))]]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("RESULT ")), None)
        if line is None:
            res[name] = {"error": f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}"}
        else:
            res[name] = json.loads(line[len("RESULT "):])
        if res[name].get("error"):
            print(f"  {name}: FAILED: {res[name]['error'][:2000]}", flush=True)
            if proc.returncode == 0 and proc.stderr:
                print("    " + proc.stderr[-1500:].replace("\n", "\n    "), flush=True)
        else:
            info = res[name]
            print(f"  {name}: {mean(info.get('step_s', [])):.3f} s/step, set-up {info.get('setup_s', 0):.1f}s, "
                  f"peak RSS {info['maxrss_mb']:.0f} MB ({time.time() - t0:.0f}s)", flush=True)
    return res


def harness(doc: str, script: str, children: dict[str, Callable[[argparse.Namespace], dict]],
            default_children: list[str], rows_fn: Callable[[str, dict, argparse.Namespace], list[dict]],
            defaults: dict, add_args: Optional[Callable[[argparse.ArgumentParser], None]] = None,
            block_size: int = 256) -> None:
    """Parse arguments; as ``--child NAME`` run one loop and print ``RESULT {json}``; else prepare the
    models, run every (size, child) in its own subprocess and print one markdown table per size."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="small,medium", help=f"comma list of {', '.join(SIZES)}")
    p.add_argument("--loops", default=",".join(default_children), help=f"comma list of {', '.join(children)}")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed steps (default {defaults['warmup']})")
    p.add_argument("--steps", type=int, default=None, help=f"timed steps (default {defaults['steps']})")
    p.add_argument("--quick", action="store_true", help="smoke run: small size, 1 warmup + 2 timed steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per core)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds: each runs every loop once, so its ratios compare loops minutes apart; with more than "
                        "one, every round's table, then the medians over the rounds (read these on a shared host)")
    p.add_argument("--work", default=None, help="folder for the generated models (default: benchmarks/out/work)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--size", default=None, help=argparse.SUPPRESS)
    if add_args:
        add_args(p)
    a = p.parse_args()
    if a.repeats < 1:
        p.error(f"--repeats {a.repeats}: at least 1")
    if a.quick:  # explicit --warmup/--steps still win
        a.warmup = 1 if a.warmup is None else a.warmup
        a.steps = 2 if a.steps is None else a.steps
        if getattr(a, "x_max_pairs", None) == 0:
            a.x_max_pairs = 120
        if a.sizes == "small,medium":
            a.sizes = "small"
    from common import cores, machine_info, median_rows, print_table, product_rate, set_threads, write_json

    a.warmup = defaults["warmup"] if a.warmup is None else a.warmup
    a.steps = defaults["steps"] if a.steps is None else a.steps
    a.threads = a.threads or cores()
    a.work = a.work or str(ROOT / "benchmarks" / "out" / "work")
    a.block_size = block_size
    if a.child:
        set_threads(a.threads)
        a.dirs = prepare_models(Path(a.work), [a.size], block_size)[a.size]
        error, res = None, {}
        t0 = time.perf_counter()
        try:
            res = children[a.child](a)
        except Exception as e:  # still report what is known
            import traceback

            traceback.print_exc()
            error = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        res.update(maxrss_mb=maxrss_mb(), wall_s=time.perf_counter() - t0, error=error)
        print("RESULT " + json.dumps(res, default=str), flush=True)
        return

    set_threads(a.threads)
    machine = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in machine.items()))
    try:
        print(f"load average: {os.getloadavg()[0]:.1f} (1 min) on {cores()} cores"
              + ("  ** BUSY MACHINE: timings are unreliable **" if os.getloadavg()[0] > 0.5 * cores() else ""))
    except OSError:
        pass
    sizes = a.sizes.split(",")
    prepare_models(Path(a.work), sizes, block_size)
    results = {}
    for size in sizes:
        print(f"\n== size {size}: {SIZES[size]}, vocab {VOCAB}, context {block_size}; "
              f"{a.warmup} warmup + {a.steps} timed steps, {a.threads} threads", flush=True)
        rounds = []
        for k in range(a.repeats):
            if a.repeats > 1:
                print(f"\n-- round {k + 1} of {a.repeats} (fp32 product {product_rate()} GFLOP/s)", flush=True)
            res = run_loops(a, script, size)
            rows = rows_fn(size, res, a)
            if rows:
                print_table(rows, list(rows[0]), title=f"size {size} ({SIZES[size]})"
                            + (f", round {k + 1} of {a.repeats}" if a.repeats > 1 else ""))
            rounds.append({"raw": res, "rows": rows})
        rows = median_rows([r["rows"] for r in rounds])
        if a.repeats > 1 and rows:
            print_table(rows, list(rows[0]), title=f"size {size} ({SIZES[size]}): medians of {a.repeats} rounds")
        results[size] = {"rows": rows, "rounds": rounds}
    machine["fp32_gflops_end"] = product_rate()
    print(f"\nfp32 product rate: {machine['fp32_gflops']} GFLOP/s at the start, {machine['fp32_gflops_end']} at the end")
    write_json(a.json, {"machine": machine, "argv": {k: v for k, v in vars(a).items() if k != "dirs"}, "results": results})
