"""`hone export RUN --format hf|peft|gguf|ollama`: write a run's model in an ecosystem's format, then prove
it behaves like the trained model (parity.py) and say so in its model card.

    result = export_run("runs/demo", "gguf", quant="q8_0")
    result["passed"]        # False -> `hone export` exits 4

Formats: hf (merged transformers directory, hf.py), peft (the adapter alone, peft.py), gguf (one GGUF
file, gguf.py), ollama (the GGUF plus a Modelfile, ollama.py). Every export directory holds README.md (the
model card, card.py) and parity.json.
"""

from __future__ import annotations

import gc
import json
import os
import re
import time
from pathlib import Path

from hone.export.chat import ExportError, held_out_prompts, run_system_prompt, stop_ids
from hone.export.parity import Side, compare, default_prompts, load_prompts

FORMATS = ("hf", "peft", "gguf", "ollama")
EXIT_PARITY_FAILED = 4
DEFAULT_QUANT = "f16"
HELD_OUT_PROMPTS = 4
LOADERS = {"hf": "transformers AutoModelForCausalLM / AutoTokenizer",
           "peft": "peft PeftModel.from_pretrained over the base (transformers), AutoTokenizer, GenerationConfig",
           "gguf": "transformers' GGUF reader (from_pretrained(dir, gguf_file=...))",
           "ollama": "transformers' GGUF reader (from_pretrained(dir, gguf_file=...)); Ollama itself not run"}

__all__ = ["EXIT_PARITY_FAILED", "FORMATS", "ExportError", "export_run", "check_request"]


def check_request(run_dir: Path, fmt: str, quant: str | None, out: Path | None,
                  check_only: bool = False) -> tuple[dict, str | None, Path]:
    """Everything that can be checked before a model loads: (run config, GGUF type or None, export dir)."""
    import yaml

    from hone.export.gguf import QUANTS

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if not (run_dir / "config.yaml").is_file() or not (run_dir / "final").is_dir():
        raise ExportError(f"{run_dir}: not a finished hone run (needs config.yaml and final/)")
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    if fmt in ("hf", "peft") and quant:
        raise ExportError(f"--quant applies to gguf and ollama exports; --format {fmt} writes float32 weights")
    if fmt in ("gguf", "ollama"):
        quant = quant or DEFAULT_QUANT
        if quant not in QUANTS:
            raise ExportError(f"--quant {quant}: GGUF types hone writes are {', '.join(QUANTS)} (k-quants need "
                              "llama.cpp's llama-quantize on the f16 file)")
    _check_adapter(run_dir, fmt)
    out = out or run_dir / "exports" / (fmt + (f"-{quant}" if quant else ""))
    if check_only and not out.is_dir():
        raise ExportError(f"--check-only: no export at {out}")
    if out.exists() and any(out.iterdir()) and not (out / "parity.json").is_file():
        raise ExportError(f"--out {out}: exists and is not an earlier export; choose a new or empty directory")
    return cfg, quant, out


def _check_adapter(run_dir: Path, fmt: str) -> None:
    from hone.export.hf import PROMPT_LEARNING_HINT

    config_path = run_dir / "final" / "adapter_config.json"
    kind = json.loads(config_path.read_text()).get("peft_type", "") if config_path.is_file() else None
    if kind is None and fmt == "peft":
        raise ExportError("this run trained all weights: there is no adapter to export. Use --format hf")
    if kind in ("PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING") and fmt != "peft":
        raise ExportError(PROMPT_LEARNING_HINT.format(kind=kind.lower().replace("_", " ")))


def run_tokenizer(run_dir: Path, loaded):
    """The tokenizer the run saved with its weights (its chat template is the one training rendered with)."""
    from transformers import AutoTokenizer

    from hone.data.template import ensure_chat_template

    final = run_dir / "final"
    tok = AutoTokenizer.from_pretrained(final) if (final / "tokenizer_config.json").is_file() else loaded.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    ensure_chat_template(tok)
    return tok


def export_run(run_dir: str | Path, fmt: str, *, out: str | Path | None = None, quant: str | None = None,
               prompts_file: str | Path | None = None, max_new_tokens: int = 32, check_only: bool = False,
               log=lambda msg: None) -> dict:
    """Write the export, check parity, write README.md and parity.json; returns parity.json's content.
    With check_only, an existing export in `out` is re-checked as it stands (after a copy or an edit)."""
    from hone.models.load import load_model

    run_dir = Path(run_dir)
    cfg, quant, out = check_request(run_dir, fmt, quant, Path(out) if out else None, check_only)
    prompts = load_prompts(prompts_file) if prompts_file else default_prompts(
        held_out_prompts(run_dir, cfg, HELD_OUT_PROMPTS))
    log(f"loading the trained model from {run_dir}")
    loaded = load_model(str(run_dir))
    tokenizer = run_tokenizer(run_dir, loaded)
    stops = stop_ids(tokenizer, getattr(loaded.model, "generation_config", None))
    reference = Side(loaded.model, tokenizer, stops, tokenizer.pad_token_id)
    start = time.perf_counter()
    log(f"{'re-checking' if check_only else 'writing'} the {fmt} export in {out}")
    written = (_reopen if check_only else _write)(fmt, quant, loaded.model, tokenizer, stops, cfg, run_dir, out)
    write_seconds = time.perf_counter() - start
    quant = written.get("quant", quant)  # a re-checked GGUF is checked as the type it holds
    gc.collect()
    log(f"reloading it with {LOADERS[fmt]} and comparing on {len(prompts)} prompts")
    t = time.perf_counter()
    export = written.pop("load")()
    parity = compare(reference, export, prompts, fmt=fmt, quant=quant, max_new_tokens=max_new_tokens)
    parity["loader"] = LOADERS[fmt]
    if fmt == "ollama":
        _check_ollama(parity, export, prompts, out, written)
    parity.update(out=str(out), files=_sizes(out), write_seconds=write_seconds,
                  check_seconds=time.perf_counter() - t, run=str(run_dir))
    _finish(out, run_dir, cfg, fmt, quant, parity, written)
    return parity


def _write(fmt, quant, model, tokenizer, stops, cfg, run_dir: Path, out: Path) -> dict:
    """Write the export; returns {"load": a function reloading it as a Side, "usage": text, ...}."""
    from hone.export import hf, peft

    if fmt == "peft":
        base = peft.base_source(cfg)
        peft.write_peft(model, tokenizer, stops, base, out)
        return {"load": lambda: peft.load_peft_export(out, base), "usage": _peft_usage(out, base),
                "base_note": base["note"]}
    merged = hf.merged_model(model)
    if fmt == "hf":
        hf.write_hf(merged, tokenizer, stops, out)
        return {"load": lambda: hf.load_hf_export(out), "usage": _hf_usage(out)}
    from hone.export.gguf import load_gguf_export, write_gguf

    name = f"{_slug(cfg.get('name') or run_dir.name)}-{quant}.gguf"
    system = run_system_prompt(run_dir, cfg)
    modelfile = None
    if fmt == "ollama":  # refuse an untranslatable template before the GGUF is written
        from hone.export.ollama import modelfile as build_modelfile

        modelfile = build_modelfile(tokenizer, stops, name, system)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.gguf"), out / "Modelfile"]:  # an earlier export here (check_request allows only that)
        stale.unlink(missing_ok=True)
    partial = out / (name + ".partial")
    write_gguf(merged, tokenizer, stops, partial, quant, name=cfg.get("name") or run_dir.name,
               description=f"hone export of {run_dir}")
    os.replace(partial, out / name)
    del merged
    if modelfile:
        (out / "Modelfile").write_text(modelfile)
    return {"load": lambda: load_gguf_export(out / name), "system": system, "name": name,
            "usage": _gguf_usage(out, name, fmt)}


def _check_ollama(parity: dict, export: Side, prompts, out: Path, written: dict) -> None:
    """The Modelfile must run the reloaded GGUF as transformers does: its template must render every parity
    prompt as the GGUF's Jinja template does, and it must stop on the GGUF's stop token."""
    from hone.export.ollama import check_modelfile, translation_check

    path = out / "Modelfile"
    try:
        parity["ollama_template"] = translation_check(export.tokenizer, prompts, written["system"])
        parity["failures"] += check_modelfile(path.read_text() if path.is_file() else None, export.tokenizer,
                                              export.eos, written["name"], written["system"])
    except ExportError as e:
        parity["ollama_template"] = None
        parity["failures"].append(f"ollama: {e}")
    t = parity["ollama_template"]
    if t and t["identical"] < t["of"]:
        parity["failures"].append(f"ollama: the Modelfile TEMPLATE renders {t['of'] - t['identical']} of "
                                  f"{t['of']} prompts differently from the chat template")
    parity["passed"] = not parity["failures"]


def _reopen(fmt, quant, model, tokenizer, stops, cfg, run_dir: Path, out: Path) -> dict:
    """An existing export, to re-check: the same loaders and usage text as `_write` gives."""
    from hone.export import hf, peft
    from hone.export.gguf import load_gguf_export

    if fmt == "peft":
        base = peft.base_source(cfg)
        return {"load": lambda: peft.load_peft_export(out, base), "usage": _peft_usage(out, base),
                "base_note": base["note"]}
    if fmt == "hf":
        return {"load": lambda: hf.load_hf_export(out), "usage": _hf_usage(out)}
    files = sorted(out.glob("*.gguf"))
    if len(files) != 1:
        raise ExportError(f"{out}: expected one .gguf file to re-check, found {len(files)}")
    from hone.export.gguf import gguf_quant

    name = files[0].name
    return {"load": lambda: load_gguf_export(out / name), "system": run_system_prompt(run_dir, cfg),
            "name": name, "quant": gguf_quant(files[0]), "usage": _gguf_usage(out, name, fmt)}


def _finish(out: Path, run_dir: Path, cfg: dict, fmt: str, quant: str | None, parity: dict, written: dict) -> None:
    from hone.export.card import model_card

    (out / "parity.json").write_text(json.dumps(parity, indent=2))
    (out / "README.md").write_text(model_card(run_dir=run_dir, cfg=cfg, fmt=fmt, quant=quant, parity=parity,
                                              usage=written["usage"], base_note=written.get("base_note"),
                                              system=run_system_prompt(run_dir, cfg)))


def _sizes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(out.iterdir())
            if p.is_file() and p.name not in ("README.md", "parity.json")}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"


def _hf_usage(out: Path) -> str:
    return ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
            f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})\n"
            "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"...\"}], add_generation_prompt=True, "
            "return_tensors=\"pt\", return_dict=True)\n"
            "print(tok.decode(model.generate(**ids, max_new_tokens=64)[0]))  # stops via generation_config.json\n```")


def _peft_usage(out: Path, base: dict) -> str:
    gguf = f", gguf_file={base['gguf_file']!r}" if base.get("gguf_file") else ""
    return ("```python\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig\n"
            f"base = AutoModelForCausalLM.from_pretrained({base['path']!r}{gguf})\n"
            f"model = PeftModel.from_pretrained(base, {str(out)!r})\n"
            f"tok = AutoTokenizer.from_pretrained({str(out)!r})\n"
            f"gen = GenerationConfig.from_pretrained({str(out)!r})  # the stop ids: pass it to generate()\n```\n\n"
            f"Base: {base['note']}.")


def _gguf_usage(out: Path, name: str, fmt: str) -> str:
    text = (f"`llama-cli -m {out / name} -cnv` (llama.cpp reads the chat template and stop token from the "
            f"file), or in Python: `AutoModelForCausalLM.from_pretrained({str(out)!r}, gguf_file={name!r})`.")
    if fmt == "ollama":
        text = (f"`cd {out} && ollama create {name.rsplit('-', 1)[0]} -f Modelfile && ollama run "
                f"{name.rsplit('-', 1)[0]}`\n\n" + text)
    return text
