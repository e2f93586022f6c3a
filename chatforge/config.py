"""Configuration: one dataclass per concern, YAML presets, dotted CLI overrides.

A preset YAML holds shared sections at the top level and one optional section per
stage under ``stages:``; a stage's config is the dataclass defaults, then the shared
sections, then ``stages.<stage>``, then the command line (``--optim.lr=3e-4``).
Merging and type checking are done by OmegaConf against these dataclasses, so an
unknown key or a value of the wrong type is an error that names the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from chatforge.config_merge import coerce_lists, merge_layers, parse_overrides, read_yaml  # noqa: F401  (parse_overrides: API)
from chatforge.errors import ConfigError

STAGES = ("pretrain", "sft", "rm", "ppo", "dpo", "grpo")


@dataclass
class ModelConfig:
    init: Optional[str] = None
    """Starting model: a chatforge or Hugging Face model directory. None = random init (pretraining)."""
    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Number of attention (query) heads."""
    n_kv_head: Optional[int] = None
    """Number of key/value heads (grouped-query attention). None = n_head (multi-head attention)."""
    n_embd: int = 128
    """Hidden size d."""
    intermediate_size: Optional[int] = None
    """SwiGLU inner size. None = 8/3 * n_embd rounded up to a multiple of 32 (Llama's rule)."""
    block_size: int = 256
    """Context length in tokens (max_position_embeddings)."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    dropout: float = 0.0
    """Dropout on attention and residual branches (pretraining only; off in RL)."""
    trust_remote_code: bool = False
    """Allow a Hugging Face model directory to run its own code (off unless asked)."""


@dataclass
class TokenizerConfig:
    path: Optional[str] = None
    """A tokenizer directory (or model directory). None = train one from the pretraining corpus."""
    vocab_size: int = 2048
    """BPE vocabulary size including the 256 bytes and special tokens; 0 = bytes only."""
    sample_chars: int = 200_000_000
    """The BPE is trained on a deterministic sample of the corpus of about this many characters
    (each file's first documents, in proportion to its size); a smaller corpus is used whole."""


@dataclass
class DataConfig:
    path: list[str] = field(default_factory=list)
    """Input files or folders (text for pretrain; JSON/JSONL for the other stages)."""
    val_fraction: float = 0.1
    """Fraction held out for evaluation (the tail of the corpus for pretraining)."""
    val_path: list[str] = field(default_factory=list)
    """Optional explicit held-out files; when set, val_fraction is ignored."""
    sampling: str = "random"
    """Pretraining batches: 'random' windows or 'sequential' chunks."""
    max_examples: int = 0
    """Use at most this many training records (0 = all)."""
    overlong: str = "truncate"
    """Records longer than the context: 'truncate' (keep the prefix, counted) or 'drop' (counted)."""
    seed: int = 0
    """Seed of the train/val split of record-based data."""
    strict: bool = True
    """Bad records are errors (True) or counted, reported skips (False; e.g. the real HH-RLHF file has 9 flawed pairs)."""
    val_split: str = "documents"
    """Pretraining validation rule: 'documents' (an evenly spread share val_fraction of whole documents; the
    tail rule when no document falls into it, e.g. one long text) or 'tail' (the last val_fraction of the
    token stream, as nanoGPT splits Tiny Shakespeare). Ignored when val_path is set."""
    mixture: list[Any] = field(default_factory=list)
    """Pretraining corpora sampled by weight instead of data.path: [{path: FILE_OR_FOLDER_OR_LIST, weight: 1.0,
    name: optional}, ...]; the realised tokens per source are logged as tokens/<name>."""
    cache_dir: Optional[str] = None
    """Shared token cache folder (None = $CHATFORGE_CACHE/tokens, else ~/.cache/chatforge/tokens)."""
    shard_tokens: int = 100_000_000
    """Tokens per cache shard file (part of the cache key)."""


@dataclass
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate (the actor's in PPO)."""
    min_lr_ratio: float = 0.1
    """Cosine decay floor as a fraction of lr."""
    warmup_steps: int = 100
    """Linear warmup steps."""
    decay_steps: Optional[int] = None
    """Steps of the cosine decay; None = train.max_steps."""
    schedule: str = "cosine"
    """'cosine' (warmup then cosine to min_lr) or 'constant' (warmup then flat)."""
    weight_decay: float = 0.1
    """AdamW weight decay on matrices (never on norms, embeddings or heads' biases)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = off)."""
    fused: bool = True
    """Use the fused AdamW kernel where the device supports it."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps (PPO/GRPO: rollout iterations)."""
    batch_size: int = 16
    """Micro-batch size per process (sequences, pairs or prompts)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step and process."""
    eval_every: int = 100
    """Evaluate every N steps (0 = only at the end)."""
    eval_batches: int = 0
    """Cap on eval micro-batches (0 = the whole validation split)."""
    log_every: int = 10
    """Write a metrics row every N steps."""
    ckpt_every: int = 200
    """Save a resumable checkpoint every N steps (and always at the end)."""
    seed: int = 1337
    """Seed of model init, data order and sampling."""
    dtype: str = "auto"
    """Compute dtype: 'auto' (bf16 autocast on CUDA with bf16 support, else fp32), 'bf16' or 'fp32'."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda' or 'cuda:N'."""
    compile: bool = False
    """torch.compile the model."""
    progress: bool = True
    """Show a progress bar."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""
    restart: bool = False
    """Start over in --out: remove the run that is there (its checkpoint, metrics, weights, chatforge.json) instead
    of resuming it (a run resumes only with the inputs its checkpoint was written for)."""
    trackers: list[str] = field(default_factory=list)
    """Experiment trackers that also get every metrics.jsonl row (rank 0): any of 'tensorboard', 'wandb',
    'trackio' (optional packages: pip install 'chatforge[track]'). W&B runs offline unless configured."""


@dataclass
class DistConfig:
    strategy: str = "ddp"
    """'ddp' (replicate) or 'fsdp' (FSDP2 fully_shard) when WORLD_SIZE > 1."""
    backend: str = "auto"
    """Process-group backend: 'auto' (nccl on CUDA, else gloo), 'nccl' or 'gloo'."""
    timeout_s: float = 300.0
    """Process-group timeout: a mismatched collective fails after this instead of hanging."""
    wait_timeout_s: Optional[float] = None
    """Timeout of barriers around rank-0-only work (tokenizing, saving); None = max(3600, timeout_s)."""


@dataclass
class SFTConfig:
    eval_prompts: list[str] = field(default_factory=list)
    """Prompts answered (greedy and sampled) at each eval and written to metrics.jsonl."""
    max_new_tokens: int = 64
    """Length cap of those eval answers."""
    n_eval_prompts: int = 4
    """When eval_prompts is empty: answer the prompts of the first N held-out conversations (0 = none)."""


@dataclass
class RMConfig:
    margin: float = 0.0
    """Bradley-Terry margin m: loss = -log sigmoid(r_c - r_r - m)."""
    calibration_bins: int = 10
    """Bins of the held-out calibration table."""
    norm_samples: int = 512
    """Responses scored to compute the normalisation mean/std stored in chatforge.json."""
    group_by_prompt: bool = True
    """Batch the pairs of one prompt together and score each distinct answer once (InstructGPT's K-wise
    batching: K answers ranked for a prompt give K(K-1)/2 pairs for K forward passes)."""
    pair_weighting: str = "pair"
    """'pair': every pair weighs the same (prompts with more answers weigh more); 'prompt': each pair of a prompt
    whose pairs rank k distinct answers weighs 1/C(k,2), as InstructGPT, so every fully ranked prompt weighs the
    same (the loss is the weighted mean over the step's pairs). On the demo's pairs (configs/tiny.yaml, 400 steps,
    1,536 held-out pairs) 'pair' measured better: held-out accuracy 0.865 vs 0.835, loss 0.339 vs 0.366."""


@dataclass
class RLConfig:
    algo: str = "ppo"
    """'ppo', 'grpo' or 'rloo'."""
    reward_model: Optional[str] = None
    """Reward model directory (a chatforge rm/ output)."""
    reward_fn: Optional[str] = None
    """'module:function' of (prompt, response) -> float, used instead of a reward model."""
    prompts_per_step: int = 8
    """Prompts per rollout batch (per process)."""
    group_size: int = 4
    """Samples per prompt (GRPO/RLOO)."""
    max_new_tokens: int = 32
    """Rollout length cap."""
    temperature: float = 1.0
    """Sampling temperature of rollouts (also applied to policy/reference log-probs)."""
    ppo_epochs: int = 4
    """PPO epochs over each rollout batch."""
    minibatches: int = 1
    """Minibatches per PPO epoch."""
    clip_eps: float = 0.2
    """Policy ratio clip."""
    value_clip_eps: float = 0.2
    """Value clip."""
    vf_coef: float = 0.1
    """Value-loss weight."""
    critic_lr: Optional[float] = None
    """Critic learning rate; None = optim.lr."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.05
    """KL penalty coefficient beta (initial value when adaptive)."""
    kl_estimator: str = "k1"
    """'k1' (log-ratio) or 'k3' ((r-1) - log r) per-token KL estimator."""
    kl_target: Optional[float] = None
    """Target KL per sequence for the adaptive controller; None = fixed beta."""
    kl_horizon: int = 10000
    """Adaptive KL controller horizon."""
    reward_clip: Optional[float] = None
    """Clip normalised scores to [-c, c]; None = off."""
    missing_eos_penalty: Optional[float] = -1.0
    """Penalty of a response that never ends (<= 0 in 'subtract' mode); None = use the reward as is."""
    missing_eos_mode: str = "subtract"
    """'subtract': an unfinished response scores its (clipped) reward + missing_eos_penalty, i.e. |penalty| less
    (as TRL; never more than the same response finished); 'replace': it scores missing_eos_penalty itself."""
    weight_decay: Optional[float] = 0.0
    """AdamW weight decay of the actor and critic (PPO/GRPO/RLOO use this instead of optim.weight_decay: the KL
    term, not decay, keeps the policy near its start; 0 as in TRL's RL trainers). None = optim.weight_decay."""
    grpo_eps: float = 1e-4
    """GRPO advantage (r - mean) / (std + eps): eps keeps near-tied groups from being blown up to +-1."""
    whiten_advantages: bool = True
    """Whiten advantages over the (global) batch."""
    loss_averaging: str = "token"
    """GRPO/RLOO loss: 'token' (mean over all tokens) or 'sequence' (mean of per-sequence means)."""
    grpo_kl_coef: float = 0.0
    """GRPO/RLOO KL-to-reference loss weight (k3); 0 = off, no reference model kept."""
    sample_every: int = 10
    """Write a few prompt/response samples to metrics.jsonl every N steps."""
    offload_frozen: bool = False
    """Move frozen roles (reference, reward) to CPU between phases."""


@dataclass
class DPOConfig:
    beta: float = 0.1
    """DPO temperature beta."""
    loss: str = "sigmoid"
    """'sigmoid' (DPO) or 'ipo'."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training instead of on the fly (under the same autocast as the
    policy's, so the step-0 loss is exactly log 2)."""


@dataclass
class LoraConfig:
    r: int = 0
    """LoRA rank; 0 = full fine-tuning."""
    alpha: float = 16.0
    """LoRA alpha."""
    dropout: float = 0.0
    """LoRA dropout."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt."""
    merge: bool = True
    """Merge adapters into the weights on save (the output is a plain HF directory)."""


PIPELINE_SECTIONS = ("recipe", "demo")
"""Top-level YAML sections that belong to the pipeline, not to the stages."""


@dataclass
class Config:
    """Everything one stage needs. Sections not used by a stage are ignored by it."""

    stage: str = "pretrain"
    """The stage this config was resolved for."""
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class ResolvedRun:
    """What a stage decided from its inputs, kept apart from its (read-only) config and recorded in
    chatforge.json under ``resolved``."""

    model: ModelConfig
    """The trained model's real shape (a starting model's own, for every stage but a fresh pretraining)."""
    algo: Optional[str] = None
    """The RL algorithm run (grpo/rloo stage: rl.algo, 'grpo' unless told 'rloo')."""


CHOICES = {
    "data.sampling": ("random", "sequential"),
    "data.val_split": ("documents", "tail"),
    "data.overlong": ("truncate", "drop"),
    "optim.schedule": ("cosine", "constant"),
    "train.dtype": ("auto", "bf16", "fp32"),
    "dist.strategy": ("ddp", "fsdp"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "rl.algo": ("ppo", "grpo", "rloo"),
    "rl.kl_estimator": ("k1", "k3"),
    "rl.loss_averaging": ("token", "sequence"),
    "dpo.loss": ("sigmoid", "ipo"),
    "rl.missing_eos_mode": ("subtract", "replace"),
    "rm.pair_weighting": ("pair", "prompt"),
}


def load_config(stage: str, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Resolve a stage's config: defaults <- YAML shared sections <- YAML stages.<stage> <- overrides.

    ``overrides`` are dotlist entries (``optim.lr=3e-4``); use :func:`parse_overrides` for argv.
    """
    schema = OmegaConf.structured(Config)
    layers: list[tuple[str, Any]] = []
    if path is not None:
        raw = read_yaml(path)
        for section in PIPELINE_SECTIONS:  # the pipeline's own sections (load_pipeline_config)
            raw.pop(section, None)
        stages = raw.pop("stages", None) or {}
        for s in stages:
            if s not in STAGES:
                raise ConfigError(f"{path}: unknown stage section 'stages.{s}'. Valid stages: {', '.join(STAGES)}")
        layers.append((str(path), raw))
        if stage in stages:
            layers.append((f"{path} (stages.{stage})", stages[stage]))
    dotlist = coerce_lists(schema, overrides or [])
    layers.append(("command line", OmegaConf.from_dotlist(dotlist)))
    layers.append(("stage", OmegaConf.create({"stage": stage})))
    cfg: Config = merge_layers(schema, layers)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check choices and ranges that types alone cannot express."""
    for key, choices in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in choices:
            raise ConfigError(f"bad value for '{key}': {value!r}; choose one of {', '.join(choices)}")
    positive = ["train.batch_size", "train.grad_accum", "model.n_layer", "model.n_head", "model.n_embd", "model.block_size"]
    for key in positive:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) <= 0:
            raise ConfigError(f"bad value for '{key}': must be > 0")
    if cfg.train.max_steps < 0:
        raise ConfigError("bad value for 'train.max_steps': must be >= 0")
    if cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(f"model.n_embd={cfg.model.n_embd} must be divisible by model.n_head={cfg.model.n_head}")
    kv = cfg.model.n_kv_head or cfg.model.n_head
    if cfg.model.n_head % kv:
        raise ConfigError(f"model.n_head={cfg.model.n_head} must be divisible by model.n_kv_head={kv}")
    p = cfg.rl.missing_eos_penalty
    if cfg.rl.missing_eos_mode == "subtract" and p is not None and p > 0:
        raise ConfigError(f"bad value for 'rl.missing_eos_penalty': {p} would reward a response that never ends; "
                          f"in 'subtract' mode give it <= 0 (TRL's missing_eos_penalty=1.0 is -1.0 here)")
    if cfg.rl.grpo_eps <= 0 or (cfg.rl.weight_decay is not None and cfg.rl.weight_decay < 0):
        raise ConfigError("bad value for 'rl.grpo_eps' (must be > 0) or 'rl.weight_decay' (must be >= 0)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("bad value for 'data.val_fraction': must be in [0, 1)")


def to_dict(cfg: Any) -> dict:
    """A plain, JSON-ready dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(d: dict, stage: Optional[str] = None) -> Config:
    """Rebuild a Config from :func:`to_dict` output (e.g. a saved chatforge.json)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(d))
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    if stage is not None:
        cfg.stage = stage
    return cfg
