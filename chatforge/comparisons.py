"""The reward model's comparisons for a recipe on the user's data: answers sampled from the SFT model, ranked by
a program or by people (``recipe.comparisons``; the demo's judge-labelled pairs live in chatforge/pipeline.py).

    program   ``ranker(prompt, responses) -> scores`` (one number per response, higher is better) ranks the k
              answers of each prompt; answers with equal scores tie. Written to pairs/candidates.jsonl
              (the answers) and pairs/train.jsonl (the pairs).
    people    the candidates are written to labels/candidates.jsonl and the run stops (WaitingForLabels) until
              labels/labels.jsonl ranks enough prompts (recipe.comparisons.min_labels; 0 = all of them).

Either way every answer of a better tie group is preferred to every answer of a worse one (pairs grouped by
prompt, as the rm stage batches them); chatforge/data/labels.py holds the file formats and the expansion.
The candidates are sampled once per (SFT model, prompts, sampling settings): a rerun reuses them, and new
candidates (after the SFT model changed) move the old candidates and labels to labels/archive/ first.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from chatforge.checkpoint import atomic_write_json, atomic_write_text
from chatforge.errors import UserInputError
from chatforge.data.labels import (Candidate, Label, label_pairs, make_candidate, read_candidates, read_labels,
                                   write_candidates)

PIPELINE_FILE = "pipeline.json"


def _prompt_json(p) -> object:
    m = p.messages
    return m[0]["content"] if len(m) == 1 and m[0]["role"] == "user" else m


def comparison_prompts(pipe) -> tuple[list, str]:
    """The prompts whose answers are ranked (recipe.comparisons.prompts, else the RL prompts) and their digest."""
    from chatforge.data.prompts import read_prompts
    from chatforge.steps import data_digest

    comp = pipe.recipe.comparisons
    if comp.prompts:
        paths = comp.prompts
    elif pipe.data_file("rl_prompts").is_file():
        paths = [str(pipe.data_file("rl_prompts"))]
    else:
        paths = pipe.stage_config(pipe.rl_stage()).data.path
    prompts = [_prompt_json(p) for p in read_prompts(paths)]
    if comp.max_prompts:
        prompts = prompts[:comp.max_prompts]
    return prompts, data_digest(paths)


def sample_candidates(model_dir: str, prompts: list, comp, device: str = "cpu") -> list[Candidate]:
    """k answers per prompt from the model (temperature ``comp.temperature``), empty answers dropped."""
    from chatforge.evaluate import generate
    from chatforge.model.load import load_causal_lm

    model, _, tok = load_causal_lm(model_dir, device)
    k = comp.samples_per_prompt
    ans = generate(model, tok, [p for p in prompts for _ in range(k)], max_new_tokens=comp.max_new_tokens,
                   temperature=comp.temperature, seed=comp.seed, batch_size=max(k, 64 // k * k))
    out = []
    for i, p in enumerate(prompts):
        texts = [t for t in ans.texts[i * k:(i + 1) * k] if t.strip()]
        out.append(make_candidate(p, texts))
    return out


def rank_by_program(ranker: str, candidates: list[Candidate]) -> list[Label]:
    """Each candidate's answers ranked by ``ranker(prompt, responses) -> scores`` into tie groups, best first."""
    from chatforge.rl.reward import import_function

    fn = import_function(ranker)
    labels = []
    for n, c in enumerate(candidates):
        texts = [a["text"] for a in c.answers]
        scores = fn(c.prompt, texts)
        try:
            scores = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise UserInputError(f"ranker {ranker}: returned {scores!r} for prompt {n}; it must return one number "
                             "per response") from None
        if len(scores) != len(texts) or not all(math.isfinite(s) for s in scores):
            raise UserInputError(f"ranker {ranker}: returned {len(scores)} scores for the {len(texts)} responses of "
                             f"prompt {n} (or a non-finite one): {scores}")
        groups: dict[float, list[str]] = {}
        for a, s in zip(c.answers, scores):
            groups.setdefault(s, []).append(a["id"])
        ranking = [groups[s] for s in sorted(groups, reverse=True)]
        labels.append(Label(c.prompt_id, c.prompt, {a["id"]: a["text"] for a in c.answers}, ranking,
                            f"ranker {ranker}", {"scores": scores}))
    return labels


def _candidates(pipe, folder: Path, fp: str, spec: dict, archive: bool) -> tuple[list[Candidate], bool]:
    """The candidates of this fingerprint: reused from ``folder`` when written for it, else sampled (old
    candidates and labels moved to folder/archive/ first when ``archive``)."""
    path, meta = folder / "candidates.jsonl", folder / "candidates.json"
    if meta.is_file() and path.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp:
        return list(read_candidates(path).values()), False
    if archive and path.is_file():
        old = folder / "archive" / time.strftime("%Y%m%d-%H%M%S")
        old.mkdir(parents=True, exist_ok=True)
        for name in ("candidates.jsonl", "candidates.json", "labels.jsonl"):
            if (folder / name).is_file():
                shutil.move(str(folder / name), str(old / name))
        pipe.log(f"   the SFT model or the prompts changed: earlier candidates and labels moved to {old}")
    folder.mkdir(parents=True, exist_ok=True)
    prompts, _ = comparison_prompts(pipe)
    cands = sample_candidates(spec["model"], prompts, pipe.recipe.comparisons, pipe.device)
    write_candidates(path, cands)
    atomic_write_json(meta, {"fingerprint": fp, "spec": spec, "prompts": len(cands),
                             "answers": sum(len(c.answers) for c in cands)})
    return cands, True


def waiting_message(pipe, n: int, needed: int, total: int) -> str:
    lab = pipe.root / "labels"
    cands, labels = lab / "candidates.jsonl", lab / "labels.jsonl"
    model = pipe.sampling_model()
    cfg = f" --config {pipe.config_path}" if pipe.config_path else ""
    return (f"waiting for people's rankings: {n} of the {needed} prompts needed are ranked in {labels} "
            f"({total} candidate prompts with their answers in {cands}).\n"
            f"  rank them in the labelling page:  chatforge serve --model {model} --labels-dir {lab} "
            f"--candidates {cands}   then open /label\n"
            f"  or add lines to {labels} by hand, one per prompt: {{\"prompt_id\": ..., \"ranking\": "
            f"[[best id], [next id, tied id], ...], \"time\": ...}} (ids from candidates.jsonl)\n"
            f"  then run the same command again (chatforge pipeline{cfg} --out {pipe.root} ...): it continues from "
            f"here; --recipe.comparisons.min_labels=N goes on once N prompts are ranked.")


def build_comparisons(pipe):
    """The pairs step of a recipe whose comparisons are ranked by a program or by people -> StepResult."""
    from chatforge.steps import WaitingForLabels, StepResult, digest, path_digest

    comp = pipe.recipe.comparisons
    model = pipe.sampling_model()
    _, prompts_fp = comparison_prompts(pipe)
    spec = {"model": model, "model_digest": path_digest(model), "prompts": prompts_fp,
            "max_prompts": comp.max_prompts, "k": comp.samples_per_prompt, "max_new_tokens": comp.max_new_tokens,
            "temperature": comp.temperature, "seed": comp.seed}
    cand_fp = digest({k: v for k, v in spec.items() if k != "model"})
    d = pipe.root / "pairs"
    if comp.source == "program":
        cands, _ = _candidates(pipe, d, cand_fp, spec, archive=False)
        fp = digest({"candidates": cand_fp, "ranker": comp.ranker})
        if "pairs" not in pipe.force and _recorded(d) == fp and (d / "train.jsonl").is_file():
            return StepResult("skipped")
        labels = rank_by_program(comp.ranker, cands)
        stats = {"source": "program", "ranker": comp.ranker}
    else:
        lab = pipe.root / "labels"
        cands, fresh = _candidates(pipe, lab, cand_fp, spec, archive=True)
        labels_path = lab / "labels.jsonl"
        by_id = {c.prompt_id: c for c in cands}
        labels = read_labels(labels_path, by_id) if labels_path.is_file() else []
        needed = min(comp.min_labels, len(cands)) if comp.min_labels else len(cands)
        if len(labels) < needed or not cands:
            raise WaitingForLabels(waiting_message(pipe, len(labels), needed, len(cands)))
        from chatforge.evaluate import file_digest

        fp = digest({"candidates": cand_fp, "labels": file_digest(labels_path)})
        if "pairs" not in pipe.force and _recorded(d) == fp and (d / "train.jsonl").is_file():
            return StepResult("skipped")
        stats = {"source": "people", "labels_file": str(labels_path),
                 "labelers": sorted({lb.extra.get("labeler", "") for lb in labels} - {""})}
    rows = [r for lb in labels for r in label_pairs(lb)]
    stats.update({"candidate_prompts": len(cands), "ranked_prompts": len(labels),
                  "prompts_with_pairs": len({r["prompt_id"] for r in rows}), "pairs": len(rows)})
    if not rows:
        raise UserInputError(f"{d}: the rankings give no preference pairs ({stats}); every ranked prompt has all its "
                         "answers tied or unranked")
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_json(d / PIPELINE_FILE, {"fingerprint": fp, "spec": spec, "stats": stats})
    return StepResult("ran", detail=stats)


def _recorded(d: Path):
    rec = d / PIPELINE_FILE
    return json.loads(rec.read_text()).get("fingerprint") if rec.is_file() else None
