"""The program tests/test_distributed.py launches under torchrun (2 CPU processes, gloo).

One launch runs a whole *plan* -- several stage runs in sequence inside one process group --
because each torchrun start costs seconds of imports per process. Usage::

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py plan PLAN.json
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py mismatch TIMEOUT_S

PLAN.json: {"timeout_s": float, "report": path, "jobs": [{"stage", "config", "out", "overrides": [...],
"copy_from": dir or null, "spy": bool, "crash": {"rank", "step", "marker"} or null}]}. ``copy_from`` copies a
finished run folder (its checkpoint included) to ``out`` first, so the job resumes it. ``crash``: the process
of that global rank dies (``os._exit``) as it starts the given step (1-based), once: only while the marker file
does not exist, which it then writes, so the process torchrun restarts (``--max-restarts``) runs on. Each job
prints the checkpoint step it starts from and torchrun's restart count. ``spy`` records, on every rank, each call of
``losses.whiten`` and of ``rollout_metrics`` (as the RL stages call it); after the job the ranks gather what they saw and
rank 0 writes to the report the statistics each rank used next to the true global ones.

``mismatch``: rank 1 skips an all-reduce that rank 0 enters and then stays busy; rank 0 must fail
after the process-group timeout, so the launch ends (non-zero) instead of hanging.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from chatforge import distributed as D  # noqa: E402
from chatforge.config import DistConfig, load_config  # noqa: E402


def _stats(values: torch.Tensor) -> tuple[float, float]:
    """(mean, unbiased variance) in float64."""
    v = values.double()
    return v.mean().item(), v.var(unbiased=True).item() if v.numel() > 1 else 0.0


class Spy:
    """Records whiten() and rollout_metrics() calls of one job on this rank (patched in, then restored)."""

    def __init__(self):
        import chatforge.losses as L

        self.L = L
        self.whiten_calls: list[dict] = []
        self.metric_calls: list[dict] = []
        self._orig_whiten = L.whiten

        def whiten(x, mask, *args, **kwargs):
            mean, var = kwargs.get("mean"), kwargs.get("var")
            self.whiten_calls.append({
                "values": x.detach().float().cpu()[mask.detach().cpu() > 0],  # this rank's entries
                "mean": None if mean is None else float(mean), "var": None if var is None else float(var)})
            return self._orig_whiten(x, mask, *args, **kwargs)

        L.whiten = whiten
        from chatforge.stages import grpo, ppo

        self.stages = (ppo, grpo)  # the stages call rollout_metrics by these names
        self._orig_metrics = ppo.rollout_metrics

        def rollout_metrics(r):
            out = self._orig_metrics(r)
            self.metric_calls.append({"norm": r.norm.detach().float().cpu(), "reward": float(out["reward"]),
                                      "n": len(r.batch)})
            return out

        for stage in self.stages:
            stage.rollout_metrics = rollout_metrics

    def restore(self) -> None:
        self.L.whiten = self._orig_whiten
        for stage in self.stages:
            stage.rollout_metrics = self._orig_metrics

    def report(self) -> dict:
        """Gather every rank's records; the global statistics next to those the ranks used."""
        mine = {"whiten": self.whiten_calls, "metrics": self.metric_calls}
        every = D.all_gather_objects(mine)  # [rank] -> records
        whiten = []
        counts = [len(r["whiten"]) for r in every]
        for i in range(min(counts)):
            calls = [r["whiten"][i] for r in every]
            g_mean, g_var = _stats(torch.cat([c["values"] for c in calls]))
            whiten.append({"global_mean": g_mean, "global_var": g_var,
                           "used_mean": [c["mean"] for c in calls], "used_var": [c["var"] for c in calls],
                           "local": [_stats(c["values"]) for c in calls]})
        metrics = []
        for i in range(min(len(r["metrics"]) for r in every)):
            calls = [r["metrics"][i] for r in every]
            allv = torch.cat([c["norm"] for c in calls])
            metrics.append({"logged_reward": [c["reward"] for c in calls], "global_mean": allv.double().mean().item(),
                            "local_means": [c["norm"].double().mean().item() for c in calls],
                            "rows_per_rank": [c["n"] for c in calls]})
        return {"whiten_calls_per_rank": counts, "whiten": whiten, "metrics": metrics}


def crash_at(crash: dict, rank: int):
    """Make this process die as it starts step ``crash["step"]`` if it is rank ``crash["rank"]`` and the marker
    file does not exist yet (it is written first). Returns a function that undoes the patch."""
    from chatforge.trainer import Trainer

    marker = Path(crash["marker"])
    if rank != crash["rank"] or marker.exists():
        return lambda: None
    real = Trainer.set_lr  # called once at the start of every step with the 0-based step index

    def set_lr(self, step):
        if step + 1 == crash["step"]:
            marker.write_text(f"rank {rank} died at step {step + 1}\n")
            print(f"dist_worker: rank {rank} dies at step {step + 1}", flush=True)
            os._exit(17)
        return real(self, step)

    Trainer.set_lr = set_lr

    def undo() -> None:
        Trainer.set_lr = real

    return undo


def run_plan(plan: dict) -> None:
    info = D.init(DistConfig(backend="gloo", timeout_s=plan.get("timeout_s", 60.0)), "cpu")
    report: dict = {"world_size": info.world_size, "jobs": {}}
    for job in plan["jobs"]:
        t0 = time.time()
        out = Path(job["out"])
        if job.get("copy_from") and info.is_main:
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(job["copy_from"], out)
        D.barrier()
        cfg = load_config(job["stage"], job.get("config"), job.get("overrides", []))
        if info.is_main:
            ckpt = out / "checkpoint" / "state.pt"
            start = torch.load(ckpt, map_location="cpu", weights_only=False)["step"] if ckpt.is_file() else 0
            print(f"dist_worker: {job.get('name', out)} starts at checkpoint step {start} "
                  f"(restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')})", flush=True)
        spy = Spy() if job.get("spy") else None
        undo = crash_at(job["crash"], info.rank) if job.get("crash") else None
        try:
            importlib.import_module(f"chatforge.stages.{job['stage']}").run(cfg, out)
        finally:
            if spy is not None:
                spy.restore()
            if undo is not None:
                undo()
        entry = {"seconds": round(time.time() - t0, 2)}
        if spy is not None:
            entry.update(spy.report())
        report["jobs"][job.get("name", str(out))] = entry
        if info.is_main:
            print(f"dist_worker: {job.get('name', out)} done in {entry['seconds']}s", flush=True)
    if info.is_main:
        Path(plan["report"]).write_text(json.dumps(report, indent=1))
    D.barrier()
    D.shutdown()


def run_mismatch(timeout_s: float) -> None:
    info = D.init(DistConfig(backend="gloo", timeout_s=timeout_s), "cpu")
    x = torch.ones(4)
    D.all_reduce_sum(x)  # a matched collective first: the group works
    if info.rank == 1:
        print("dist_worker: rank 1 skips the all-reduce and stays busy", flush=True)
        time.sleep(600)  # alive but never entering the collective: a hang unless rank 0 times out
    else:
        t0 = time.time()
        try:
            D.all_reduce_sum(x)
        except Exception as e:  # gloo raises after the process-group timeout
            print(f"dist_worker: rank 0 collective failed after {time.time() - t0:.1f}s: "
                  f"{type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
            os._exit(3)
        print("dist_worker: rank 0 collective returned (unexpected)", flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "plan":
        run_plan(json.loads(Path(sys.argv[2]).read_text()))
    elif mode == "mismatch":
        run_mismatch(float(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
