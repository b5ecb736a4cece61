"""Make a smaller model by keeping some of its decoder layers: the usual start for a distillation student.

    keep = layer_indices("every-other", 30)     # [0, 2, 4, ..., 28]
    shrink_model(model, keep)                   # in place: a real model of the new depth
    hone model shrink BASE --keep every-other --out DIR

The kept layers start from pretrained weights (DistilBERT initialised its student from every other layer of
BERT), so the student begins much closer to its teacher than a random model of the same size. A shrunk model
is an ordinary one: the config's layer count and every module's `layer_idx` (the KV-cache slot a layer
writes while generating) are renumbered, so it generates, saves with save_pretrained or hone's save_hf_dir,
and reloads as a plain HF directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hone.models.load import ModelError

LAYER_SPEC_HELP = "'every-other', 'first:N', or a comma-separated list of layer indices such as '0,2,4'"


class LayerSpecError(ModelError):
    """A layer selection that cannot be used, phrased for the user."""


def check_layer_spec(spec: str) -> None:
    """Raise LayerSpecError if `spec` is not well formed (what can be checked without the model's depth)."""
    layer_indices(spec, None)


def layer_indices(spec: str, n_layers: int | None) -> list[int]:
    """The 0-based decoder layers a spec keeps, in order. With n_layers None, only the syntax is checked."""
    text = spec.strip().lower()
    if text == "every-other":
        return list(range(0, n_layers, 2)) if n_layers is not None else []
    if text.startswith("first:"):
        count = _int(text[len("first:"):], spec)
        if count < 1:
            raise LayerSpecError(f"layers '{spec}': first:N needs N >= 1")
        keep = list(range(count))
    else:
        keep = [_int(part, spec) for part in text.split(",")]
        if any(i < 0 for i in keep):
            raise LayerSpecError(f"layers '{spec}': layer indices start at 0")
        if keep != sorted(set(keep)):
            raise LayerSpecError(f"layers '{spec}': list each layer once, in increasing order")
    if n_layers is None:
        return keep
    if keep[-1] >= n_layers:
        raise LayerSpecError(f"layers '{spec}': the model has {n_layers} layers (0..{n_layers - 1})")
    if len(keep) == n_layers:
        raise LayerSpecError(f"layers '{spec}' keeps all {n_layers} layers: nothing would be removed")
    return keep


def _int(text: str, spec: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise LayerSpecError(f"layers '{spec}': expected {LAYER_SPEC_HELP}") from None


def decoder_with_layers(model):
    """The decoder holding the stack of layers (Llama, Mistral, Qwen, Gemma ...: get_decoder().layers)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        raise ModelError(f"{type(base).__name__}: no decoder layer stack found (expected get_decoder().layers); "
                         "hone can only shrink decoder-only language models")
    return decoder


def decoder_layers(model) -> torch.nn.ModuleList:
    return decoder_with_layers(model).layers


def shrink_model(model, keep: list[int]):
    """Keep only the decoder layers `keep` (in place) and make the model consistent with its new depth."""
    decoder = decoder_with_layers(model)
    layers = decoder.layers
    config = model.config
    n = len(layers)
    if getattr(config, "is_heterogeneous", False):
        raise ModelError("this model sets per-layer config overrides (per_layer_config); hone does not shrink it")
    if not keep or keep[-1] >= n:
        raise LayerSpecError(f"cannot keep layers {keep} of a {n}-layer model")
    decoder.layers = torch.nn.ModuleList(layers[i] for i in keep)
    for new_index, layer in enumerate(decoder.layers):
        # Each attention writes its keys/values to cache slot layer_idx; the cache has one slot per kept layer.
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == n:  # e.g. sliding vs full attention per layer
        config.layer_types = [layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return model


def merged_if_adapter(model):
    """A LoRA/(IA)3 peft model merged into plain weights (layers can then be dropped); others unchanged."""
    if not hasattr(model, "merge_and_unload"):
        return model
    if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
        raise ModelError("a prefix/prompt-tuning run cannot be merged into plain weights, so it cannot be shrunk")
    return model.merge_and_unload()


def shrink_to_dir(base: str, spec: str, out: Path, *, allow_download: bool = False,
                  trust_remote_code: bool = False) -> dict:
    """Load `base`, keep the layers of `spec`, save an HF directory at `out`. Returns what changed."""
    from hone.models.load import load_model, save_hf_dir

    check_layer_spec(spec)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ModelError(f"{out} exists and is not empty: choose another --out or remove it")
    loaded = load_model(base, allow_download=allow_download, trust_remote_code=trust_remote_code)
    model = merged_if_adapter(loaded.model)
    n_before = len(decoder_layers(model))
    params_before = sum(p.numel() for p in model.parameters())
    keep = layer_indices(spec, n_before)
    shrink_model(model, keep)
    save_hf_dir(model, loaded.tokenizer, out)
    return {"base": loaded.description, "out": str(out), "kept": keep, "layers_before": n_before,
            "layers_after": len(keep), "params_before": params_before,
            "params_after": sum(p.numel() for p in model.parameters())}
