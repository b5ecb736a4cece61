"""The model card (README.md) every export carries: where the model came from and what it was shown to do.

Base model, method and its settings, data lineage hashes (manifest.json), held-out metrics (eval_base.json /
eval_tuned.json), the parity result, how to load it, intended use and the base's licence.
"""

from __future__ import annotations

import json
from pathlib import Path

from hone.config import EMBEDDED_MODEL

# Licences hone knows without reading anything; anything else is read from the base's card or said unknown.
KNOWN_LICENCES = {EMBEDDED_MODEL: "apache-2.0"}
SKIP_METRICS = ("seconds", "latency", "tokens_per_request", "n", "invalid")


def base_licence(base: str) -> str:
    if base in KNOWN_LICENCES:
        return KNOWN_LICENCES[base]
    p = Path(base).expanduser()
    for card in (p / "README.md", p / "final" / "README.md"):
        if card.is_file():
            for line in card.read_text(encoding="utf-8", errors="replace").splitlines()[:40]:
                if line.startswith("license:"):
                    return line.split(":", 1)[1].strip() or "unknown"
    if p.is_file() and p.suffix == ".gguf":
        return _gguf_licence(p)
    return "unknown"


def _gguf_licence(path: Path) -> str:
    try:
        import gguf

        field = gguf.GGUFReader(str(path)).fields.get("general.license")
        return str(field.contents()) if field else "unknown"
    except Exception:  # an unreadable header only costs us the licence line
        return "unknown"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def metric_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    tuned = _read_json(run_dir / "eval_tuned.json").get("metrics") or {}
    base = _read_json(run_dir / "eval_base.json").get("metrics") or {}
    rows = []
    for key, value in tuned.items():
        if not isinstance(value, (int, float)) or any(s in key for s in SKIP_METRICS):
            continue
        b = base.get(key)
        rows.append((key, f"{b:.4g}" if isinstance(b, (int, float)) else "-", f"{value:.4g}"))
    return rows


def _method_lines(cfg: dict, manifest: dict) -> list[str]:
    training = manifest.get("training") or {}
    method = cfg.get("method", "sft")
    lines = [f"- method: `{method}`" + (f" (adapter `{cfg['adapter']}`)" if cfg.get("adapter") else "")]
    if training.get("weights") in ("lora", "dora", "qlora") or method in ("lora", "dora", "qlora"):
        lora = cfg.get("lora") or {}
        lines.append(f"- LoRA: r={lora.get('r')}, alpha={lora.get('alpha')}, dropout={lora.get('dropout')}, "
                     f"target_modules={lora.get('target_modules')}")
    t = cfg.get("train") or {}
    lines.append(f"- training: {training.get('steps', '?')} steps, learning rate {t.get('learning_rate')}, "
                 f"seed {t.get('seed')}, {training.get('precision', '?')} on {training.get('device', '?')}")
    for key in ("final_train_loss", "final_val_loss"):
        if key in training:
            lines.append(f"- {key.replace('_', ' ')}: {training[key]:.4f}")
    return lines


def _config_block(run_dir: Path) -> list[str]:
    """The run's fully resolved config, folded (every setting the run used)."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return []
    return ["<details><summary>config.yaml</summary>", "", "```yaml", path.read_text().rstrip(), "```", "",
            "</details>"]


def _lineage_lines(manifest: dict) -> list[str]:
    data = manifest.get("data") or {}
    lines = [f"- train: `{data.get('train')}` sha256 `{data.get('train_sha256')}`"]
    if data.get("validation"):
        lines.append(f"- validation: `{data.get('validation')}` sha256 `{data.get('validation_sha256')}`")
    lineage = data.get("lineage")
    if lineage:
        lines.append(f"- lineage (from `{lineage.get('report')}`): `{json.dumps(lineage, sort_keys=True)[:600]}`")
    return lines


def _parity_lines(parity: dict) -> list[str]:
    lg, tol = parity["logits"], parity["tolerance"]
    bound = f"{tol['max_rel_logit_diff']:.0e}" if tol["max_rel_logit_diff"] is not None else "reported only"
    s = parity["stop"]
    lines = [
        f"**{'PASSED' if parity['passed'] else 'FAILED'}** on {parity['prompts']} prompts, {parity['positions']} "
        f"token positions, after reloading this export with {parity['loader']}.",
        "",
        "| check | result | tolerance |", "|---|---|---|",
        f"| chat template: prompts rendered to the same ids | {parity['template']['identical_prompts']}/"
        f"{parity['template']['of']} | all |",
        f"| max \\|logit diff\\| / logit scale | {lg['max_rel_diff']:.2e} ({lg['max_abs_diff']:.3g} / "
        f"{lg['logit_scale']:.3g}) | {bound} |",
        f"| top-1 token agreement | {lg['top1_agreement']:.4f} | >= {tol['min_top1_agreement']} |",
        f"| greedy answers identical | {parity['generation']['identical']}/{parity['generation']['of']} | "
        f"{'all' if tol['identical_generations_required'] else 'reported'} |",
        f"| stops on the end-of-turn token {s['end_of_turn']!r} (id {s['end_of_turn_id']}) | "
        f"{'yes' if s['end_of_turn_id'] in s['export_stop_ids'] else 'NO'}; stop ids {s['export_stop_ids']} | "
        "required |",
        f"| answers that ended on a stop token, and did the same in the export | {s['reference_stopped']}, "
        f"{s['export_stopped_same']} | - |",
    ]
    lines += [f"- failure: {f}" for f in parity["failures"]]
    return lines


def _prompt_lines(parity: dict, system: str | None) -> list[str]:
    s = parity["stop"]
    lines = [f"The chat template travels with the export. Answers end with {s['end_of_turn']!r} (id "
             f"{s['end_of_turn_id']}); the export stops on ids {s['export_stop_ids']}."]
    if system:
        lines += ["", "The run trained with this system message (use it to get the trained behaviour):", "",
                  "```", system, "```"]
    return lines


def model_card(*, run_dir: Path, cfg: dict, fmt: str, quant: str | None, parity: dict, usage: str,
               base_note: str | None = None, system: str | None = None) -> str:
    manifest = _read_json(run_dir / "manifest.json")
    base = cfg["model"]["base"]
    licence = base_licence(base)
    front = ["---", f"license: {licence}", f"base_model: {base}", "library_name: " +
             ("peft" if fmt == "peft" else "gguf" if fmt in ("gguf", "ollama") else "transformers"),
             "tags: [hone, fine-tuned]", "---", ""]
    body = [f"# {cfg.get('name') or run_dir.name} ({fmt}{' ' + quant if quant else ''})", "",
            f"Exported by `hone export` from the run `{run_dir}`.", "",
            "## Base model", "", f"`{base}`" + (f": {base_note}" if base_note else ""), "",
            f"Licence of the base: **{licence}**" + (" (check the base model's terms before use)"
                                                     if licence == "unknown" else ""), "",
            "## Method", "", *_method_lines(cfg, manifest), "", *_config_block(run_dir), "",
            "## Data lineage", "", *_lineage_lines(manifest), ""]
    rows = metric_rows(run_dir)
    if rows:
        body += ["## Held-out metrics (from the run's report)", "", "| metric | base | tuned |", "|---|---|---|",
                 *[f"| {k} | {b} | {t} |" for k, b, t in rows], ""]
    body += ["## Prompt format", "", *_prompt_lines(parity, system), "",
             "## Parity with the trained model", "", *_parity_lines(parity), "",
             "## Files", "", *[f"- `{name}`: {size:,} bytes" for name, size in parity.get("files", {}).items()], "",
             "## How to use", "", usage, "",
             "## Intended use", "",
             "The task the run was trained and evaluated on (its data above), with the prompts rendered by "
             "the chat template this export carries. Outside that task, expect the base model's behaviour "
             "and limitations; evaluate before relying on it.", ""]
    return "\n".join(front + body)
