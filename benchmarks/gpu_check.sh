#!/usr/bin/env bash
# GPU check: pretraining speed of a 124M model (GPT-2 small shape, Llama architecture) in bf16 with
# torch.compile on one GPU (tokens/s and MFU), then a scale-out check through the real command:
# `torchrun -m chatforge pretrain --dist.strategy=fsdp` (FSDP2) -- and ddp -- on every GPU of the
# machine, writing a Hugging Face directory that transformers loads. On a one-GPU machine the
# FSDP check runs 2 processes on the same GPU over gloo (informative only; it cannot fail the script).
# Last, where pytest is installed, the engine's tests on the GPU (the flat, scripted decode step against the
# modules' forward, fp32 and bf16).
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   STEPS=300 CORPUS_MB=10 WHEELS=.whl bash benchmarks/gpu_check.sh
#
# Needs: python3 with torch (CUDA), numpy, tokenizers, safetensors, transformers, tqdm, pyyaml.
# omegaconf is installed from wheels in $WHEELS (default .whl/) when missing -- the GPU machine
# has no network: `pip download --no-deps omegaconf==2.4.0 -d .whl` beforehand (see the README, "Scaling out").
# Data: the generated demo corpus (chatforge.demo), so nothing outside the repository is needed.
# Log and results: $OUT (if set) else benchmarks/out/: gpu_check.log, bench.json, fsdp_check.json.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RESULTS="${OUT:-$ROOT/benchmarks/out}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu_check.log"
exec > >(tee "$LOG") 2>&1

PY="${PYTHON:-python3}"
STEPS="${STEPS:-300}"
CORPUS_MB="${CORPUS_MB:-10}"
WHEELS="${WHEELS:-$ROOT/.whl}"
WORK="${WORK:-/tmp/chatforge_gpu_check}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$WORK"; mkdir -p "$WORK"
declare -A STATUS

section() { echo; echo "=== $* ($(date +%H:%M:%S))"; }

section "environment"
uname -a
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi unavailable"
"$PY" --version

section "dependencies"
if ! "$PY" -c "import omegaconf" 2>/dev/null; then
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
  else
    echo "error: omegaconf is not installed and no wheels in $WHEELS (pip download --no-deps omegaconf==2.4.0 -d .whl)"
    exit 2
  fi
fi
"$PY" - <<'EOF'
import importlib, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available {torch.cuda.is_available()}, "
      f"devices {torch.cuda.device_count()}, bf16 {torch.cuda.is_available() and torch.cuda.is_bf16_supported()}")
for name in ("numpy", "tokenizers", "safetensors", "transformers", "omegaconf", "yaml", "tqdm", "triton"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except Exception as e:  # report, the sections below fail if it matters
        print(f"{name} MISSING ({type(e).__name__})")
assert torch.cuda.is_available(), "no CUDA device visible to torch"
EOF
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"

section "data: ${CORPUS_MB} MB demo corpus and a BPE tokenizer (target 50304 ids)"
"$PY" - "$WORK" "$CORPUS_MB" <<'EOF'
import sys, time
from pathlib import Path
from chatforge.demo.corpus import generate_corpus
from chatforge.tokenizer import train_tokenizer
work, mb = Path(sys.argv[1]), float(sys.argv[2])
t = time.time()
docs = generate_corpus(0, int(mb * 2**20))
(work / "corpus.txt").write_text("<|endoftext|>".join(docs), encoding="utf-8")
tok = train_tokenizer(docs, 50304)
tok.save(work / "tokenizer")
print(f"{len(docs)} documents, {tok.vocab_size} tokenizer ids (the demo world's words run out of merges "
      f"before 50304; the model pads its vocabulary to 50304), {time.time() - t:.0f}s")
EOF

section "124M pretraining: bf16, torch.compile, ${STEPS} steps, 1 GPU"
if "$PY" benchmarks/gpu_pretrain.py --data "$WORK/corpus.txt" --tokenizer "$WORK/tokenizer" --out "$WORK/bench124m" \
    --steps "$STEPS"; then
  STATUS[bench124m]=PASS
  cp "$WORK/bench124m/bench.json" "$RESULTS/bench.json"
else
  STATUS[bench124m]="FAIL ($?)"
fi

# ---- scale-out through the CLI: a smaller model, short runs
SMALL=(--config configs/micro.yaml --data.path="$WORK/corpus.txt" --tokenizer.path="$WORK/tokenizer"
       --model.n_layer=6 --model.n_head=6 --model.n_embd=384 --model.block_size=256
       --train.max_steps=40 --train.batch_size=8 --train.eval_every=0 --train.ckpt_every=20
       --train.log_every=1 --train.dtype=bf16 --optim.decay_steps=40 --dist.timeout_s=120)

fsdp_run() {  # $1 name, $2 nproc, rest: extra overrides
  local name="$1" nproc="$2"; shift 2
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m chatforge pretrain \
    --out "$WORK/$name" "${SMALL[@]}" "$@"
}

compare() {  # $1 tolerance on the final loss, then run names (first = reference); writes fsdp_check.json
  "$PY" - "$WORK" "$RESULTS/fsdp_check.json" "$@" <<'EOF'
import json, sys
from pathlib import Path
import torch
from chatforge.metrics import read_metrics
from chatforge.model.load import load_causal_lm
work, out, tol, names = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4:]
res = {}
for n in names:
    rows = [r for r in read_metrics(work / n) if r.get("kind") == "train"]
    res[n] = {"losses": [round(r["loss"], 4) for r in rows], "tokens_per_s": rows[-1].get("tokens_per_s"),
              "mfu": rows[-1].get("mfu")}
    print(f"{n}: {len(rows)} steps, loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, "
          f"{rows[-1].get('tokens_per_s', 0):,.0f} tokens/s")
ref = res[names[0]]["losses"][-1]
ok = all(abs(res[n]["losses"][-1] - ref) < tol for n in names[1:])
# the FSDP run's directory: chatforge and transformers load it and agree
fsdp = next(n for n in names if "fsdp" in n)
model, _, tok = load_causal_lm(work / fsdp)
from transformers import AutoModelForCausalLM
hf = AutoModelForCausalLM.from_pretrained(work / fsdp, dtype=torch.float32)
x = torch.randint(0, tok.vocab_size, (2, 32))
with torch.no_grad():
    diff = (hf(x).logits - model(x)).abs().max().item()
res["hf_logits_max_diff"] = diff
ok = ok and diff < 1e-3
res["ok"] = ok
out.write_text(json.dumps(res, indent=1))
print(f"final losses within {tol}: {ok}; transformers vs chatforge logits max |diff| {diff:.2e}")
sys.exit(0 if ok else 1)
EOF
}

if [ "$NGPU" -gt 1 ]; then
  section "scale-out: FSDP2 and DDP on $NGPU GPUs (nccl) vs 1 GPU with ${NGPU}x accumulation"
  # one GPU with NGPU x accumulation, FSDP2 and DDP on all GPUs (same global batch), and an FSDP2
  # checkpoint (step 20) resumed on one GPU to step 40
  if fsdp_run one 1 --train.grad_accum="$NGPU" \
     && fsdp_run fsdp "$NGPU" --dist.strategy=fsdp \
     && fsdp_run ddp "$NGPU" --dist.strategy=ddp \
     && fsdp_run fsdp20to1 "$NGPU" --dist.strategy=fsdp --train.max_steps=20 \
     && fsdp_run fsdp20to1 1 --train.grad_accum="$NGPU" \
     && compare 0.05 one fsdp ddp fsdp20to1; then
    STATUS[fsdp]=PASS
  else
    STATUS[fsdp]="FAIL"
  fi
else
  section "scale-out: 1 GPU -- FSDP2 with 2 processes sharing it over gloo (informative) vs 1 process, 2x accumulation"
  if fsdp_run one 1 --train.grad_accum=2 \
     && fsdp_run fsdp_gloo 2 --dist.strategy=fsdp --dist.backend=gloo --train.device=cuda:0 \
     && compare 0.05 one fsdp_gloo; then
    STATUS[fsdp_1gpu_gloo]=PASS
  else
    STATUS[fsdp_1gpu_gloo]="FAIL (informative only: 2 processes on one GPU are not a supported layout)"
  fi
fi

section "generation on the GPU: the flat, scripted decode step against the modules (tests/test_engine.py)"
if "$PY" -c "import pytest" 2>/dev/null; then
  if "$PY" -m pytest -q -p no:cacheprovider tests/test_engine.py -k "on_cuda or bit_for_bit or kept or segments"; then
    STATUS[decode]=PASS
  else
    STATUS[decode]=FAIL
  fi
else
  echo "pytest is not installed here: skipped"
fi

section "summary"
if [ -f "$RESULTS/bench.json" ]; then
  "$PY" -c "
import json; b = json.load(open('$RESULTS/bench.json'))
mfu = 'n/a' if b['median_mfu'] is None else f\"{100 * b['median_mfu']:.1f}%\"
print(f\"124M on {b['device']}: {b['median_tokens_per_s']:,} tokens/s, MFU {mfu} (median of steps after compile), \"
      f\"loss {b['first_loss']:.3f} -> {b['last_loss']:.3f} in {b['steps']} steps, first step {b['first_step_s']}s, \"
      f\"peak memory {b['max_memory_GiB']} GiB\")"
fi
rc=0
for k in "${!STATUS[@]}"; do
  echo "$k: ${STATUS[$k]}"
  case "$k:${STATUS[$k]}" in
    fsdp_1gpu_gloo:*) ;;
    *:PASS) ;;
    *) rc=1 ;;
  esac
done
echo "log: $LOG"
exit $rc
