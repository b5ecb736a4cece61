"""`hone data prepare RECIPE.yaml`: the whole data pipeline as one reproducible recipe.

A recipe names its raw sources and the stages to run on them, in order; each stage reads the previous
stage's output. Options are exactly the stage's Options fields (the same as its CLI flags):

    sources: [exports/support.mbox, exports/slack/]   # relative to the recipe file
    output_dir: prepared                             # default: <recipe name>.prepared/ next to the recipe
    steps:
      - ingest: {}
      - clean: {min_chars: 20}
      - redact: {mode: pseudonym}
      - convert: {to: chat, agents: ["@acme.com"]}
      - dedup: {threshold: 0.8}
      - split: {validation: 0.1, test: 0.1}

Stage outputs go to `output_dir/NN-stage.jsonl` with their rejects and reports; `split` (if present, it
must be last) writes train/validation/test.jsonl. `prepare.json` in output_dir sums it up: each stage's
count arithmetic, the final files, and the recipe's hash. `hone train` accepts `data.prepare: RECIPE` and
runs the recipe first, then trains on its train (and validation) files.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from hone.data.readers import DataError
from hone.data.stage import StageReport, config_hash, content_hash, write_json_atomic

# Stage name -> module under hone.data; each module has `<Name>Options` and a function `<name>`.
STAGES = ("ingest", "clean", "dedup", "redact", "convert", "synth", "split")


class RecipeError(DataError):
    """The recipe file itself is wrong: names the file and the step or key."""


def stage_parts(name: str) -> tuple[type[BaseModel], Any]:
    module = importlib.import_module(f"hone.data.{name}")
    return getattr(module, f"{name.capitalize()}Options"), getattr(module, name)


def load_recipe(path: Path) -> dict:
    """Parse and check a recipe: sources exist, stage names known, every option valid for its stage."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with 'sources' and 'steps'")
    unknown = sorted(set(raw) - {"sources", "steps", "output_dir"})
    if unknown:
        raise RecipeError(f"{path}: unknown key(s) {', '.join(unknown)}; a recipe has sources, steps, output_dir")
    base = path.parent
    sources = raw.get("sources")
    if isinstance(sources, str):
        sources = [sources]
    if not sources or not all(isinstance(s, str) for s in sources):
        raise RecipeError(f"{path}: 'sources' must list at least one file or folder")
    resolved = [(base / s) if not Path(s).is_absolute() else Path(s) for s in sources]
    for s in resolved:
        if not s.exists():
            raise RecipeError(f"{path}: source {s} not found")
    steps = [_check_step(path, i, step) for i, step in enumerate(raw.get("steps") or [], 1)]
    if not steps:
        raise RecipeError(f"{path}: 'steps' is empty; list the stages to run, e.g. - ingest: {{}}")
    if any(name == "split" for name, _ in steps[:-1]):
        raise RecipeError(f"{path}: 'split' must be the last step (it writes train/validation/test files)")
    output_dir = base / raw["output_dir"] if raw.get("output_dir") else path.with_suffix(".prepared")
    return {"path": path, "sources": resolved, "steps": steps, "output_dir": output_dir, "raw": raw}


def _check_step(path: Path, i: int, step: Any) -> tuple[str, BaseModel]:
    if isinstance(step, str):
        step = {step: {}}
    if not isinstance(step, dict) or len(step) != 1:
        raise RecipeError(f"{path}: step {i} must be one stage name with its options, e.g. '- clean: {{}}'")
    (name, options), = step.items()
    if name not in STAGES:
        raise RecipeError(f"{path}: step {i}: unknown stage '{name}'; stages: {', '.join(STAGES)}")
    options_class, _ = stage_parts(name)
    try:
        return name, options_class(**(options or {}))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors())
        raise RecipeError(f"{path}: step {i} ({name}): {problems}") from None
    except TypeError:
        raise RecipeError(f"{path}: step {i} ({name}): options must be a mapping") from None


def prepare(recipe_path: Path, on_stage=None) -> dict:
    """Run every step of a recipe; return (and write to output_dir/prepare.json) the summary.

    `on_stage(report)` is called after each stage (the CLI prints its arithmetic)."""
    recipe = load_recipe(recipe_path)
    out_dir: Path = recipe["output_dir"]
    out_dir.mkdir(parents=True, exist_ok=True)
    inputs: list[Path] = recipe["sources"]
    reports: list[StageReport] = []
    for i, (name, options) in enumerate(recipe["steps"], 1):
        _, run = stage_parts(name)
        target = out_dir if name == "split" else out_dir / f"{i:02d}-{name}.jsonl"
        report = run(inputs, target, options)
        reports.append(report)
        if on_stage:
            on_stage(report)
        if report.records_out == 0:
            from hone.data.stage import rejects_path

            raise RecipeError(f"{recipe['path']}: step {i} ({name}) kept no records ({report.arithmetic()}); "
                              f"the reasons are in {rejects_path(target)}")
        inputs = [target]
    final = _final_files(recipe["steps"][-1][0], reports[-1], out_dir)
    summary = {
        "recipe": str(recipe["path"]), "recipe_sha256": content_hash(recipe["path"]),
        "steps_sha256": config_hash([{n: o.model_dump()} for n, o in recipe["steps"]]),
        "sources": [{"path": str(s), "sha256": content_hash(s)} for s in recipe["sources"]],
        "stages": [{"stage": r.stage, "output": r.output, "arithmetic": r.arithmetic(), "seconds": round(r.seconds, 2)}
                   for r in reports],
        "files": final,
    }
    write_json_atomic(out_dir / "prepare.json", summary)
    return summary


def _final_files(last: str, report: StageReport, out_dir: Path) -> dict[str, str]:
    if last == "split":
        return {name: info["path"] for name, info in report.details["splits"].items() if info["records"]}
    return {"train": report.output}
