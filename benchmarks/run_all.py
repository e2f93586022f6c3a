"""Run every ``benchmarks/*_speed.py`` script in turn (``make bench``).

Each script runs in its own process (fresh compile caches, no shared state) with the benchmark
environment's interpreter ``.venv-bench/bin/python`` when it exists (it has TRL, which the stage
benchmarks compare against; ``bash benchmarks/make_bench_env.sh`` creates it), else this
interpreter. Results are printed, and written as JSON to ``benchmarks/out/<name>.json``.
Extra arguments are passed to every script, e.g. ``python benchmarks/run_all.py --threads 2``;
``--only sft,rm`` runs just those scripts; ``--quick`` (a smoke run) is passed to the scripts that
accept it and replaced by a short equivalent for those that do not (pretrain_speed.py); ``--repeats N``
(rounds, then medians) goes to the scripts on the shared harness (the TRL comparisons and
generate_speed.py), not to the others.
Exit status: the number of scripts that failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH_PYTHON = HERE.parent / ".venv-bench" / "bin" / "python"
# --quick for scripts without the flag
QUICK_FALLBACK = {"pretrain_speed": ["--shapes", "small", "--warmup", "1", "--steps", "2", "--variants", "fp32-eager"]}


def main() -> int:
    args = sys.argv[1:]
    only = None
    if "--only" in args:
        i = args.index("--only")
        only = {f"{x}_speed" for x in args[i + 1].split(",")}
        del args[i:i + 2]
    quick = "--quick" in args
    args = [x for x in args if x != "--quick"]
    repeats = []
    if "--repeats" in args:
        i = args.index("--repeats")
        repeats = args[i:i + 2]
        del args[i:i + 2]
    python = str(BENCH_PYTHON) if BENCH_PYTHON.exists() else sys.executable
    print(f"interpreter: {python}")
    scripts = [s for s in sorted(HERE.glob("*_speed.py")) if only is None or s.stem in only]
    if not scripts:
        print("no benchmarks/*_speed.py scripts found")
        return 0
    failed = []
    for script in scripts:
        out = HERE / "out" / f"{script.stem}.json"
        extra, text = list(args), script.read_text()
        shared = "C.harness(" in text  # the shared harness (benchmarks/peers/trl_common.py): --quick, --repeats
        if quick:
            extra += ["--quick"] if shared or '"--quick"' in text else QUICK_FALLBACK.get(script.stem, [])
        if shared:
            extra += repeats
        cmd = [python, str(script), "--json", str(out), *extra]
        print(f"\n### {script.name}: {' '.join(cmd)}", flush=True)
        t0 = time.time()
        rc = subprocess.call(cmd, cwd=HERE.parent)
        print(f"### {script.name}: exit {rc} after {time.time() - t0:.0f}s", flush=True)
        if rc:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
