"""The built-in demo world: a generated corpus, task families, a gold judge and a preference labeller.

Text only (no torch, no tokenizer): the engine knows token ids, the demo knows text.

    generate_corpus(seed, target_bytes) -> list[str]           corpus.py
    rl_prompts / eval_prompts (seed, n), parse_prompt         tasks.py
    sft_conversations (seed, n), demonstrate                  demonstrators.py
    gold_score / gold_breakdown (prompt, response)            judge.py
    label_pairs / gold_prefers / variant_pairs                preferences.py
    write_world(out_dir, seed, ...) -> dict[str, Path]        files.py
"""

from chatforge.demo.corpus import generate_corpus
from chatforge.demo.files import write_world
from chatforge.demo.judge import WEIGHTS, gold_breakdown, gold_score
from chatforge.demo.preferences import gold_prefers, label_pairs, variant_pairs
from chatforge.demo.demonstrators import STYLES, demonstrate, sft_conversations
from chatforge.demo.tasks import eval_prompts, is_eval_prompt, parse_prompt, rl_prompts
from chatforge.demo.world import get_world

__all__ = [
    "generate_corpus", "write_world", "gold_score", "gold_breakdown", "WEIGHTS", "gold_prefers", "label_pairs",
    "variant_pairs", "sft_conversations", "rl_prompts", "eval_prompts", "is_eval_prompt", "parse_prompt",
    "demonstrate", "STYLES", "get_world",
]
