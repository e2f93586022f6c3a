"""Run every ``benchmarks/*_speed.py`` script in turn (``make bench``).

Each script runs in its own process (fresh compile caches, no shared state) with this
interpreter; results are printed, and written as JSON to ``benchmarks/out/<name>.json``.
Extra arguments are passed to every script, e.g. ``python benchmarks/run_all.py --threads 2``.
Exit status: the number of scripts that failed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    scripts = sorted(HERE.glob("*_speed.py"))
    if not scripts:
        print("no benchmarks/*_speed.py scripts found")
        return 0
    failed = []
    for script in scripts:
        out = HERE / "out" / f"{script.stem}.json"
        cmd = [sys.executable, str(script), "--json", str(out), *sys.argv[1:]]
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
