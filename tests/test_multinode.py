"""Several machines, simulated on one: two torchrun agents as two "nodes" (``--nnodes=2 --nproc_per_node=1``,
c10d rendezvous on 127.0.0.1, gloo), against one node with two processes.

One launch per layout, each running a plan of tests/dist_worker.py (pretraining, then SFT from that base):

- one node, two processes (``--standalone --nproc_per_node=2``): the reference;
- two nodes with ``--max-restarts=1``, where the process of rank 1 dies (``os._exit``) as it starts pretraining
  step 7, once. Both agents restart their workers, the run resumes from the step-5 checkpoint, and every logged
  loss, gradient norm and the final weights equal the reference's; SFT then runs on the two nodes and equals
  the reference's too.

The agents run with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: by default torchrun's workers share the
rendezvous TCP store across restarts, where the process-group keys of the dead round are still present, and a
restarted gloo worker can read the dead peer's address ("Gloo connectFullMesh failed ... Connection refused");
with the variable set each round's workers get a fresh store (README, "Several machines").

Hang-proofing: each agent runs in its own process group, killed at a wall-clock limit; the process-group
timeout of the runs is small; the test carries a pytest timeout.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_distributed import (  # noqa: F401  (world: a fixture)
    A,
    MICRO,
    STEPS,
    WORKER,
    assert_close,
    finetune_overrides,
    losses_of,
    pretrain_overrides,
    train_rows,
    world,
)

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]

LAUNCH_LIMIT_S = 400  # per launch; every agent's process group is killed after this
CRASH_STEP = 7  # rank 1 dies as it starts this pretraining step; the last checkpoint is step 5 (ckpt_every=5)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_agents(cmds: list[list[str]], limit_s: float) -> list[tuple[int, str]]:
    """Start every torchrun command (each in its own process group), wait for all; kill all at limit_s."""
    procs = [subprocess.Popen(c, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for c in cmds]
    deadline = time.time() + limit_s
    results = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
            results.append((p.returncode, out))
    except subprocess.TimeoutExpired:
        logs = []
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # the agent and every worker it started
            logs.append(p.communicate()[0][-3000:])
        pytest.fail(f"torchrun agents did not finish in {limit_s}s (a hang?)\n" + "\n----\n".join(logs))
    return results


def plan(world: dict, root: Path, crash: dict | None = None) -> Path:
    """Pretraining (STEPS steps, checkpoints every 5), then SFT from that model, on 2 processes."""
    base = root / "pretrain"
    jobs = [dict(name="pretrain", stage="pretrain", out=str(base), crash=crash,
                 overrides=pretrain_overrides(world, A // 2, STEPS)),
            dict(name="sft", stage="sft", out=str(root / "sft"),
                 overrides=finetune_overrides("sft", world, base, A // 2))]
    root.mkdir(parents=True, exist_ok=True)
    path = root / "plan.json"
    path.write_text(json.dumps({"timeout_s": 60.0, "report": str(root / "report.json"),
                                "jobs": [{**j, "config": str(MICRO)} for j in jobs]}, indent=1))
    return path


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


@pytest.fixture(scope="module")
def one_node(world) -> Path:
    root = world["root"] / "one_node"
    [(rc, log)] = run_agents([torchrun("--standalone", "--nproc_per_node=2", str(WORKER), "plan",
                                       str(plan(world, root)))], LAUNCH_LIMIT_S)
    assert rc == 0, f"one-node launch failed (rc {rc}):\n{log[-6000:]}"
    return root


@pytest.fixture(scope="module")
def two_nodes_with_a_restart(world) -> tuple[Path, list[str], Path]:
    root = world["root"] / "two_nodes"
    marker = root / "rank1_died"
    path = plan(world, root, crash={"rank": 1, "step": CRASH_STEP, "marker": str(marker)})
    port = free_port()
    cmds = [torchrun("--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                     "--rdzv-id=chatforge-test", f"--rdzv-conf=is_host={1 if node == 0 else 0}",
                     "--local-addr=127.0.0.1", "--max-restarts=1", "--monitor-interval=0.5",
                     str(WORKER), "plan", str(path)) for node in (0, 1)]
    results = run_agents(cmds, LAUNCH_LIMIT_S)
    logs = [log for _, log in results]
    for node, (rc, log) in enumerate(results):
        assert rc == 0, f"node {node}'s agent failed (rc {rc}):\n{log[-6000:]}\n---- other node:\n" \
                        f"{results[1 - node][1][-3000:]}"
    return root, logs, marker


def test_two_nodes_with_a_restart_equal_one_node(one_node, two_nodes_with_a_restart):
    root, logs, marker = two_nodes_with_a_restart
    both = "\n".join(logs)
    # the crash happened, torchrun restarted the workers, and pretraining resumed from its step-5 checkpoint
    assert marker.read_text() == f"rank 1 died at step {CRASH_STEP}\n"
    assert f"dist_worker: rank 1 dies at step {CRASH_STEP}" in both
    # (the restart count is that of rank 0's agent: 1 if its own worker failed, 0 if it restarted for the other)
    starts = re.findall(r"dist_worker: (\w+) starts at checkpoint step (\d+)", both)  # rank 0 may change nodes
    assert sorted(starts) == [("pretrain", "0"), ("pretrain", "5"), ("sft", "0")], both[-6000:]
    # and the result is that of one node with two processes, step for step
    ref, got = one_node / "pretrain", root / "pretrain"
    assert [r["step"] for r in train_rows(got)] == list(range(1, STEPS + 1))
    assert_close(losses_of(got), losses_of(ref), "pretrain loss", tol=1e-5)
    assert_close([r["grad_norm"] for r in train_rows(got)], [r["grad_norm"] for r in train_rows(ref)],
                 "pretrain grad norm", tol=1e-5)
    from safetensors.torch import load_file

    a, b = load_file(got / "model.safetensors"), load_file(ref / "model.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    sft_ref, sft_got = losses_of(one_node / "sft"), losses_of(root / "sft")
    assert len(sft_ref) > 0
    assert_close(sft_got, sft_ref, "sft loss", tol=1e-5)
