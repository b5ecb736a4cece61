"""Which weights a run trains: a peft adapter over a frozen base, or every weight (`full`).

    model = apply_weights(model, cfg)               # after the base model was evaluated
    save_weights(model, tokenizer, cfg, final_dir)  # an adapter directory, or a full HF directory

The peft task type comes from the method (a reward model is SEQ_CLS, an embedding model FEATURE_EXTRACTION).
"""

from __future__ import annotations

from pathlib import Path

ADAPTERS = ("lora", "dora", "ia3", "qlora", "prefix", "prompt")


def apply_weights(model, cfg, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    if cfg.weights == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    return get_peft_model(model, adapter_config(cfg, task_type, modules_to_save))


def adapter_config(cfg, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    from peft import IA3Config, LoraConfig

    weights = cfg.weights
    if weights == "ia3":
        # peft's per-architecture defaults (for Llama: k_proj, v_proj and down_proj, the latter scaled on
        # its input), the placement the (IA)3 paper found best.
        return IA3Config(task_type=task_type, modules_to_save=modules_to_save)
    if weights in ("lora", "dora", "qlora"):
        return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules, use_dora=weights == "dora",
                          task_type=task_type, modules_to_save=modules_to_save)
    raise ValueError(f"adapter '{weights}' is not built yet")


def is_adapter(cfg) -> bool:
    return cfg.weights != "full"


def save_weights(model, tokenizer, cfg, target: Path) -> None:
    from hone.models.load import save_hf_dir

    if is_adapter(cfg):
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    else:
        save_hf_dir(model, tokenizer, target)


def count_params(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
