"""The trained model as a standard transformers directory: adapters merged into the base in float32,
safetensors weights, config, tokenizer with its chat template, and a generation_config whose eos_token_id
lists the chat template's end-of-turn token and the tokenizer's EOS, so plain `generate` stops where the
trained model learnt to.

    model = merged_model(loaded.model)               # a merged copy; the trained model is untouched
    write_hf(model, tokenizer, stops, out_dir)
    side = load_hf_export(out_dir)                   # plain AutoModelForCausalLM / AutoTokenizer
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from hone.export.chat import ExportError
from hone.export.parity import Side

PROMPT_LEARNING_HINT = ("{kind} adapters add learnt virtual tokens in front of the text; there are no weights "
                        "to merge them into. Export the adapter itself with --format peft.")


def merged_model(model):
    """A float32 copy of the trained model with any LoRA / DoRA / IA3 adapter merged into its weights."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return copy.deepcopy(model).float()
    config = model.active_peft_config
    if getattr(config, "is_prompt_learning", False):
        raise ExportError(PROMPT_LEARNING_HINT.format(kind=str(config.peft_type.value).lower()))
    return copy.deepcopy(model).float().merge_and_unload()


def generation_config(model, tokenizer, stops: list[int]):
    """The model's generation settings with the stop ids an export must carry."""
    from transformers import GenerationConfig

    gen = copy.deepcopy(getattr(model, "generation_config", None) or GenerationConfig())
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    if tokenizer.bos_token_id is not None:
        gen.bos_token_id = tokenizer.bos_token_id
    return gen


def write_hf(model, tokenizer, stops: list[int], out: Path) -> None:
    from hone.models.load import save_hf_dir

    model.generation_config = generation_config(model, tokenizer, stops)
    # save_hf_dir writes safetensors directly: a model whose base came from a GGUF refuses save_pretrained.
    save_hf_dir(model, tokenizer, out)


def eos_list(value) -> list[int]:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [int(value)]


def load_hf_export(out: Path) -> Side:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    gen = model.generation_config
    return Side(model, tokenizer, eos_list(gen.eos_token_id), gen.pad_token_id)
