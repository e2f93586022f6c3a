"""Evaluate a model directory with lm-evaluation-harness tasks (in-process, offline).

    results = evaluate_model("runs/tiny/sft", ["chatforge_sst2", "chatforge_wikitext2"])
    -> {"results": {task: {metric: value, ...}}, ...}  and  <model dir>/lm_eval.json  (merged by task)

Tasks are found in chatforge's own task folder (``chatforge/lm_eval/tasks``), in the folders given as
``include_paths`` (any lm-eval task YAML, e.g. one whose ``dataset_kwargs.data_files`` are local files), and
in lm-eval's built-in tasks when a name is in neither (those need their data in the local datasets cache).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from chatforge.errors import UserInputError

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
RESULTS_FILE = "lm_eval.json"


def task_manager(tasks: Sequence[str], include_paths: Sequence[str | Path] = ()):
    """An lm-eval TaskManager over chatforge's tasks and ``include_paths`` (plus lm-eval's own tasks only when
    a requested name is not among them: indexing them takes a while)."""
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *map(str, include_paths)]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if all(t in tm.all_tasks for t in tasks):
        return tm
    return TaskManager(include_path=paths, include_defaults=True)


def evaluate_model(model_dir: str | Path, tasks: Sequence[str], *, include_paths: Sequence[str | Path] = (),
                   device: str = "auto", batch_size: int = 16, limit: Optional[float] = None,
                   num_fewshot: Optional[int] = None, apply_chat_template: bool = False,
                   data_dir: Optional[str | Path] = None, output: Optional[str | Path] = None,
                   trust_remote_code: bool = False, seed: int = 0) -> dict:
    """Run ``tasks`` on the model in ``model_dir``; write the results JSON (default ``<model_dir>/lm_eval.json``,
    earlier results of other tasks kept) and return lm-eval's results dict (``results``, ``versions``, ...)."""
    from lm_eval import simple_evaluate

    from chatforge.checkpoint import atomic_write_text
    from chatforge.lm_eval.model import ChatforgeLM
    from chatforge.lm_eval.tasks.chatforge_data import DATA_ENV

    if data_dir is not None:
        os.environ[DATA_ENV] = str(Path(data_dir).resolve())
    tasks = list(tasks)
    tm = task_manager(tasks, include_paths)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        raise UserInputError(f"unknown lm-eval task(s): {', '.join(missing)}; chatforge's own: "
                             f"{', '.join(sorted(p.stem for p in TASKS_DIR.glob('*.yaml')))}; add folders of task "
                             f"YAMLs with --include-path")
    lm = ChatforgeLM(str(model_dir), device=device, batch_size=batch_size, trust_remote_code=trust_remote_code)
    res = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                          apply_chat_template=apply_chat_template, log_samples=False, random_seed=seed,
                          numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                          bootstrap_iters=1000)
    out = Path(output) if output is not None else Path(model_dir) / RESULTS_FILE
    saved = json.loads(out.read_text()) if out.is_file() else {}
    saved.setdefault("results", {})
    saved.setdefault("settings", {})
    for task, metrics in res["results"].items():
        saved["results"][task] = metrics
        saved["settings"][task] = {
            "apply_chat_template": apply_chat_template, "limit": limit, "num_fewshot": num_fewshot,
            "n_samples": res.get("n-samples", {}).get(task), "version": res.get("versions", {}).get(task),
            "lm_eval_version": _lm_eval_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    atomic_write_text(out, json.dumps(saved, indent=2, default=str) + "\n")
    res["output_file"] = str(out)
    return res


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def results_table(res: dict) -> str:
    """lm-eval's markdown table of a results dict (the one ``lm_eval`` prints)."""
    from lm_eval.utils import make_table

    return make_table(res)
