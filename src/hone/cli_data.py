"""`hone data ...`: the data preparation commands. Each reads files, writes `--out FILE` (plus
FILE's .rejects.jsonl and .report.json, see data/stage.py), and prints the count arithmetic.

Exit codes as for `hone`: 0 success, 2 bad input (a file or option that cannot be used at all). Bad
*records* never stop a stage: they go to the rejects file and are counted.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from hone.cli_common import fail, out, user_errors

data_app = typer.Typer(help="Prepare data: ingest, clean, dedup, redact, convert, synth, split, card, prepare.",
                       no_args_is_help=True)


def print_stage(report) -> None:
    """The one-paragraph summary every stage prints: what it wrote and the count arithmetic."""
    out.print(f"[bold]{report.stage}[/bold]: {escape(report.arithmetic())}", highlight=False)
    from hone.data.stage import rejects_path, report_path

    out.print(f"  wrote {escape(report.output)} ({report.records_out} records), "
              f"{escape(str(report_path(report.output)))}", highlight=False)
    if report.rejected_total:
        out.print(f"  rejects with reasons: {escape(str(rejects_path(report.output)))}", highlight=False)


@data_app.command("validate")
def data_validate(path: Path = typer.Argument(..., help="A .jsonl, .csv or .parquet file."),
                  rejects: Optional[Path] = typer.Option(None, help="Write bad lines with reasons here (JSONL).")):
    """Check a data file the way `hone train` will, and list every problem with its line."""
    from hone.config import DataConfig
    from hone.data.validate import format_problems, validate_file, write_rejects

    try:
        report = validate_file(path, instruction=DataConfig.model_fields["instruction"].default)
    except user_errors() as e:
        fail(str(e))
    shapes = ", ".join(f"{k}: {v}" for k, v in report.shapes.items()) or "none"
    out.print(f"{path}: {report.rows} rows, {len(report.records)} valid ({shapes}), {len(report.problems)} problems")
    if report.labels:
        out.print(f"labels ({len(report.labels)}): {', '.join(report.labels[:20])}"
                  + (" ..." if len(report.labels) > 20 else ""))
    if report.problems:
        out.print(format_problems(report.problems), highlight=False, markup=False)
        if rejects:
            write_rejects(rejects, report.problems)
        raise typer.Exit(2)


@data_app.command("split")
def data_split(inputs: list[Path] = typer.Argument(..., help="Record files (.jsonl/.csv/.parquet)."),
               out_dir: Path = typer.Option(..., "--out", help="Folder for train/validation/test.jsonl."),
               validation: float = typer.Option(0.1, help="Fraction of each label for validation."),
               test: float = typer.Option(0.1, help="Fraction of each label for the test set."),
               seed: int = typer.Option(0, help="The same seed gives the same split."),
               stratify: bool = typer.Option(True, help="Keep each label's share in every split.")):
    """Deterministic train/validation/test split by stable content hash, stratified by label."""
    from pydantic import ValidationError

    from hone.data.split import SplitOptions, split

    try:
        report = split(inputs, out_dir, SplitOptions(validation=validation, test=test, seed=seed,
                                                     stratify=stratify))
    except ValidationError as e:
        fail(f"bad split option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")
    except user_errors() as e:
        fail(str(e))
    out.print(f"[bold]split[/bold]: {escape(report.arithmetic())}", highlight=False)
    for name, info in report.details["splits"].items():
        out.print(f"  {name}: {info['records']} records -> {escape(info['path'])}", highlight=False)


@data_app.command("card")
def data_card(inputs: list[Path] = typer.Argument(..., help="Record files (.jsonl/.csv/.parquet)."),
              out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for card.md/json and plots "
                                                     "(default: FILE.card next to the first file)."),
              model: str = typer.Option("smollm2-135m-instruct", help="Model whose tokenizer and size to use."),
              method: str = typer.Option("lora", help="lora or full: the method the time estimate is for."),
              max_seq_len: int = typer.Option(1024, help="Longer examples count as truncated."),
              tokens_per_second: Optional[float] = typer.Option(None, help="Your measured training speed."),
              scan_limit: int = typer.Option(20000, help="Scan this many records for near duplicates and PII.")):
    """Dataset card: counts, token lengths (PNG), labels, duplicates, PII, training tokens and time per epoch."""
    from pydantic import ValidationError

    from hone.cli_common import quiet_libraries
    from hone.data.card import CardOptions, card, render_markdown

    quiet_libraries()
    target = out_dir or inputs[0].with_suffix(".card")
    try:
        options = CardOptions(model=model, method=method, max_seq_len=max_seq_len,
                              tokens_per_second=tokens_per_second, scan_limit=scan_limit)
        info = card(inputs, target, options)
    except ValidationError as e:
        fail(f"bad card option: {e.errors()[0]['loc'][0]}: {e.errors()[0]['msg']}")
    except user_errors() as e:
        fail(str(e))
    out.print(render_markdown(info), highlight=False, markup=False)
    out.print(f"wrote {escape(str(target / 'card.md'))}, card.json and {', '.join(info['plots'])}", highlight=False)


@data_app.command("prepare")
def data_prepare(recipe: Path = typer.Argument(..., help="Recipe YAML: sources and steps (see the README).")):
    """Run a whole data pipeline recipe (ingest -> clean -> ... -> split) reproducibly."""
    from hone.data.recipe import prepare

    try:
        summary = prepare(recipe, on_stage=print_stage)
    except user_errors() as e:
        fail(str(e))
    out.print("[bold]prepared:[/bold] " + ", ".join(f"{k} {escape(v)}" for k, v in summary["files"].items()),
              highlight=False)


# --- end of commands ---
