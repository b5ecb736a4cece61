"""hone's command line: one small function per command, each calling into the library.

Exit codes: 0 success, 1 the run failed, 2 bad input (config, data, model path), 130/143 interrupted by
Ctrl-C/SIGTERM after saving a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from hone.cli_common import err, fail, out, quiet_libraries, user_errors
from hone.cli_data import data_app

app = typer.Typer(help="Fine-tune general language models into domain specialists, and prove they got better.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.add_typer(data_app, name="data")
DEMO_DIR = Path(__file__).parent / "demo_data"


def _train(cfg, resume: bool) -> None:
    from hone.train.loop import Interrupted, TrainingFailed
    from hone.train.run import run_training

    try:
        outcome = run_training(cfg, resume=resume)
    except user_errors() as e:
        fail(str(e))
    except Interrupted as e:
        err.print(f"stopped; checkpoint {e.checkpoint}. Continue with: hone train CONFIG --resume")
        raise typer.Exit(128 + e.signum)
    except TrainingFailed as e:
        fail(str(e), code=1)
    _print_summary(outcome.run_dir, outcome.summary)


def _print_summary(run_dir: Path, summary: dict) -> None:
    from hone.eval.report import metric_table, verdict

    t = summary["training"]
    out.print(f"trained {t['steps']} steps in {t['seconds']:.0f}s ({t['tokens_per_second']:,.0f} tokens/s, "
              f"{t['device']}, {t['precision']})")
    ev = summary.get("eval")
    if ev:
        table = Table(title=f"held-out: {ev['n']} examples")
        table.add_column("metric")
        table.add_column("base", justify="right")
        table.add_column("tuned", justify="right")
        for row in metric_table(ev):
            if "seconds" not in row["key"]:
                table.add_row(row["metric"], row["base"], row["tuned"])
        out.print(table)
        out.print(verdict({"eval": ev}))
    out.print(f"report: [bold]{run_dir / 'report.html'}[/bold] (and report.md)")


@app.command()
def train(config: Path = typer.Argument(..., help="Run config (YAML). The smallest is `data: {train: FILE}`."),
          set_: list[str] = typer.Option([], "--set", help="Override a config key: --set train.learning_rate=1e-4"),
          resume: bool = typer.Option(False, "--resume", help="Continue the run from its newest complete checkpoint.")):
    """Fine-tune, evaluate base vs tuned on held-out data, and write a run directory with a report."""
    from hone.config import ConfigError, load_config

    quiet_libraries()
    try:
        cfg = load_config(config, set_)
    except ConfigError as e:
        fail(str(e))
    _train(cfg, resume)


@app.command()
def demo(output_dir: Path = typer.Option(Path("runs"), help="Where the run directory goes."),
         epochs: float = typer.Option(2, help="Passes over the demo training data."),
         resume: bool = typer.Option(False, "--resume", help="Continue an interrupted demo run.")):
    """Fine-tune the embedded model on the shipped support-ticket demo data and write its report."""
    from hone.config import parse_config

    quiet_libraries()
    name = "demo" if resume or not (output_dir / "demo").exists() else _next_free(output_dir, "demo")
    cfg = parse_config({
        "name": name, "output_dir": str(output_dir), "method": "lora",
        "data": {"train": str(DEMO_DIR / "tickets_train.jsonl"),
                 "validation": str(DEMO_DIR / "tickets_test.jsonl"), "max_seq_len": 256},
        "train": {"epochs": epochs, "learning_rate": 1e-3, "batch_tokens": 1024},
        "eval": {"max_new_tokens": 8},
    }, source="hone demo")
    _train(cfg, resume)


def _next_free(root: Path, base: str) -> str:
    n = 2
    while (root / f"{base}-{n}").exists():
        n += 1
    return f"{base}-{n}"


@app.command("eval")
def eval_(model: str = typer.Argument(..., help="Model: embedded name, HF directory, .gguf file or run directory."),
          data: Path = typer.Option(..., "--data", help="Held-out file (.jsonl/.csv/.parquet)."),
          max_examples: int = typer.Option(200, help="Score at most this many examples."),
          max_new_tokens: int = typer.Option(64, help="Longest generated answer."),
          output: Optional[Path] = typer.Option(None, "--out", help="Write metrics and outputs as JSON here.")):
    """Score any model (base or tuned) on a file: accuracy/macro-F1 for label data, exact match/token F1 otherwise."""
    from hone.eval.runners import evaluate_task
    from hone.train.prepare import cap_records

    quiet_libraries()
    try:
        loaded, instruction, labels = _load_for_inference(model)
        records = _eval_records(data, instruction, labels)
    except user_errors() as e:
        fail(str(e))
    records = cap_records(records, max_examples, seed=0)
    result = evaluate_task(loaded.model, loaded.tokenizer, records, labels or _labels_of(records),
                           max_new_tokens=max_new_tokens)
    table = Table(title=f"{model} on {data} ({result['n']} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)
    if output:
        output.write_text(json.dumps(result, indent=2))
        out.print(f"wrote {output}")


def _eval_records(path: Path, instruction: str, labels: list[str] | None):
    from hone.data.validate import validate_file
    from hone.train.prepare import DataProblems

    report = validate_file(path, instruction=instruction, labels=labels, dedupe=False)
    if report.problems:
        raise DataProblems(report.problems, "Fix these lines before evaluating.")
    return report.records


def _labels_of(records) -> list[str] | None:
    labels = sorted({r.label for r in records if r.label is not None})
    return labels or None


def _load_for_inference(model: str):
    """The model, and for a hone run the instruction and label set it was trained with (same prompts)."""
    from hone.config import DataConfig
    from hone.models.load import load_model

    loaded = load_model(model)
    instruction = DataConfig.model_fields["instruction"].default
    labels = None
    if loaded.run_config:
        instruction = loaded.run_config["data"]["instruction"]
        labels_file = Path(model) / "labels.json"
        labels = json.loads(labels_file.read_text()) if labels_file.is_file() else None
    return loaded, instruction, labels


def _load_orfail(model: str):
    quiet_libraries()
    try:
        return _load_for_inference(model)[0]
    except user_errors() as e:
        fail(str(e))


@app.command()
def generate(model: str = typer.Argument(..., help="Model: embedded name, HF directory, .gguf file or run directory."),
             prompt: str = typer.Option(..., "--prompt", help="The user message."),
             system: Optional[str] = typer.Option(None, help="An optional system message."),
             max_new_tokens: int = typer.Option(256, help="Longest answer.")):
    """One greedy answer to one prompt."""
    from hone.eval.runners import generate as run_generate
    from hone.records import Message

    loaded = _load_orfail(model)
    messages = ([Message("system", system)] if system else []) + [Message("user", prompt)]
    out.print(run_generate(loaded.model, loaded.tokenizer, [messages], max_new_tokens=max_new_tokens)[0],
              highlight=False, markup=False)


@app.command()
def chat(model: str = typer.Argument(..., help="Model: embedded name, HF directory, .gguf file or run directory."),
         system: Optional[str] = typer.Option(None, help="An optional system message."),
         max_new_tokens: int = typer.Option(256, help="Longest answer per turn.")):
    """Interactive chat. /reset clears the history, /exit (or Ctrl-D) quits."""
    from hone.eval.runners import generate as run_generate
    from hone.records import Message

    loaded = _load_orfail(model)
    history = [Message("system", system)] if system else []
    out.print(f"chatting with {model}; /reset clears history, /exit quits", style="dim")
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = history[:1] if system else []
            continue
        if not line:
            continue
        history.append(Message("user", line))
        answer = run_generate(loaded.model, loaded.tokenizer, [history], max_new_tokens=max_new_tokens)[0]
        history.append(Message("assistant", answer))
        out.print(f"[bold]model>[/bold] {answer}", highlight=False)


model_app = typer.Typer(help="Make models from models (e.g. a smaller distillation student).",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("shrink")
def model_shrink(base: str = typer.Argument(..., help="Model: embedded name, HF directory, .gguf file or run directory."),
                 keep: str = typer.Option("every-other", "--keep",
                                          help="Decoder layers to keep: every-other, first:N, or a list like 0,2,4."),
                 out_dir: Path = typer.Option(..., "--out", help="Where to write the smaller model (an HF directory)."),
                 allow_download: bool = typer.Option(False, "--allow-download",
                                                     help="Allow fetching BASE from the Hugging Face hub.")):
    """Keep some decoder layers of BASE and save the smaller model (a student for `method: distill`)."""
    from hone.models.shrink import shrink_to_dir

    quiet_libraries()
    try:
        info = shrink_to_dir(base, keep, out_dir, allow_download=allow_download)
    except user_errors() as e:
        fail(str(e))
    out.print(f"kept layers {info['kept']} of {info['layers_before']}: {info['params_before']:,} -> "
              f"{info['params_after']:,} parameters ({info['params_after'] / info['params_before']:.0%})")
    out.print(f"wrote [bold]{info['out']}[/bold] (use it as model.base, or as distill's student)")


# --- end of commands ---


def main() -> None:  # python -m hone
    app()


if __name__ == "__main__":
    main()
