"""Write the demo world's data files into one folder, byte-for-byte deterministic for a given seed."""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.demo.corpus import generate_corpus
from chatforge.demo.preferences import variant_pairs
from chatforge.demo.demonstrators import sft_conversations
from chatforge.demo.tasks import eval_prompts, rl_prompts

EOT = "<|endoftext|>"
MB = 1 << 20


def _write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="ascii", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=True, sort_keys=False) + "\n")


def write_world(out_dir, seed: int = 0, corpus_mb: float = 2.5, n_sft: int = 4000, n_pairs: int = 3000,
                n_rl_prompts: int = 2000, n_eval_prompts: int = 400, label_noise: float = 0.1) -> dict[str, Path]:
    """Generate every demo data file into `out_dir`; returns {"corpus", "sft", "preferences", "rl_prompts",
    "eval_prompts"} -> path.

    corpus.txt          documents joined with "<|endoftext|>" (corpus_mb MiB or a little more)
    sft.jsonl           {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}
    preferences.jsonl   {"prompt", "chosen", "rejected"} (strings; labels carry `label_noise` flips)
    rl_prompts.jsonl    {"prompt"}
    eval_prompts.jsonl  {"prompt"} (held out: disjoint from every file above)
    """
    for name, v in (("n_sft", n_sft), ("n_pairs", n_pairs), ("n_rl_prompts", n_rl_prompts),
                    ("n_eval_prompts", n_eval_prompts)):
        if v < 0:
            raise ValueError(f"write_world: {name} must be >= 0, got {v}")
    if corpus_mb < 0:
        raise ValueError(f"write_world: corpus_mb must be >= 0, got {corpus_mb}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {k: out / f for k, f in (("corpus", "corpus.txt"), ("sft", "sft.jsonl"),
                                     ("preferences", "preferences.jsonl"), ("rl_prompts", "rl_prompts.jsonl"),
                                     ("eval_prompts", "eval_prompts.jsonl"))}
    docs = generate_corpus(seed, int(corpus_mb * MB))
    paths["corpus"].write_text(EOT.join(docs), encoding="ascii", newline="\n")
    _write_jsonl(paths["sft"], sft_conversations(seed, n_sft))
    pairs = variant_pairs(seed, n_pairs, label_noise)
    _write_jsonl(paths["preferences"], ({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}
                                        for p in pairs))
    _write_jsonl(paths["rl_prompts"], ({"prompt": p} for p in rl_prompts(seed, n_rl_prompts)))
    _write_jsonl(paths["eval_prompts"], ({"prompt": p} for p in eval_prompts(seed, n_eval_prompts)))
    return paths
