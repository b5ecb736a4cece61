"""hone's command line: one small function per command, each calling into the library.

Exit codes: 0 success (for `hone train`: and every eval.targets met, or none given), 1 the run failed, 2 bad
input (config, data, model path; also a gate target naming a metric the run did not produce), 3 `hone train`
finished but missed an eval.targets target (the evaluation gate), 4 `hone export` wrote an export that failed
its parity check against the trained model, 130/143 interrupted by Ctrl-C/SIGTERM after
saving a checkpoint.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
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


@contextmanager
def training_errors():
    """How a command that trains (`hone train`, and `hone compare` training its run first) ends when training
    cannot start (exit 2), is interrupted after a checkpoint (128 + signal), or fails (exit 1)."""
    from hone.train.loop import Interrupted, TrainingFailed

    try:
        yield
    except user_errors() as e:
        fail(str(e))
    except Interrupted as e:
        err.print(f"stopped; checkpoint {e.checkpoint}. Continue with: hone train CONFIG --resume")
        raise typer.Exit(128 + e.signum)
    except TrainingFailed as e:
        fail(str(e), code=1)


def _train(cfg, resume: bool) -> None:
    from hone.train.run import run_training

    with training_errors():
        outcome = run_training(cfg, resume=resume)
    _print_summary(outcome.run_dir, outcome.summary)
    gate = outcome.summary.get("gate")
    if gate and gate.get("error"):
        fail(gate["error"])
    if gate and not gate["passed"]:
        raise typer.Exit(3)  # the evaluation gate: CI pipelines read this


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
    _print_iteration(summary)
    out.print(f"report: [bold]{run_dir / 'report.html'}[/bold] (and report.md)")


def _print_iteration(summary: dict) -> None:
    """Early stopping, the overfitting and forgetting flags, and the evaluation gate, after the metrics."""
    from hone.eval.report import early_stop_text, forgetting_text, overfitting_text

    t = summary["training"]
    lines = [(early_stop_text(t.get("early_stopping")), None)]
    if (t.get("overfitting") or {}).get("flagged"):
        lines.append((overfitting_text(t["overfitting"])[0], "yellow"))
    forgetting = forgetting_text(summary.get("forgetting"))
    if forgetting:
        lines.append((forgetting[0], "yellow" if forgetting[1] == "bad" else None))
    for line, style in lines:
        if line:
            out.print(line, style=style, highlight=False, markup=False)
    gate = summary.get("gate")
    if gate:
        table = Table(title="gate: " + ("passed" if gate["passed"] else "FAILED"))
        for col in ("target", "value", "result"):
            table.add_column(col)
        for c in gate["checks"]:
            table.add_row(c["target"], "n/a" if c["value"] is None else f"{c['value']:.4g}",
                          "[green]passed[/green]" if c["passed"] else "[red]missed[/red]")
        out.print(table)


@app.command()
def train(config: Path = typer.Argument(..., help="Run config (YAML). The smallest is `data: {train: FILE}`."),
          set_: list[str] = typer.Option([], "--set", help="Override a config key: --set train.learning_rate=1e-4"),
          resume: bool = typer.Option(False, "--resume", help="Continue the run from its newest complete checkpoint.")):
    """Fine-tune, evaluate base vs tuned on held-out data, and write a run directory with a report.

    Exit code 3 when the run finished but missed one of eval.targets (the evaluation gate)."""
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
          output: Optional[Path] = typer.Option(None, "--out", help="Write metrics and outputs as JSON here."),
          task: str = typer.Option("auto", "--task", help=(
              "classification | extraction | generation | qa | auto (classification when every record has a "
              "label, else qa): picks the metrics, as eval.task in a config.")),
          metrics: Optional[str] = typer.Option(None, "--metrics", help=(
              "Comma-separated metrics instead of the task's defaults (names as eval.metrics).")),
          calibration_bins: int = typer.Option(10, "--calibration-bins", min=1, help="Confidence bins of ECE.")):
    """Score any model (base or tuned) on a file with the task's metrics; --out also saves outputs, the
    per-example rows and the error analysis."""
    from hone.eval.runners import evaluate_task
    from hone.train.prepare import cap_records

    quiet_libraries()
    names = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else None
    _check_eval_options(task, names)
    try:
        loaded, instruction, labels = _load_for_inference(model)
        records = _eval_records(data, instruction, labels)
    except user_errors() as e:
        fail(str(e))
    records = cap_records(records, max_examples, seed=0)
    try:
        result = evaluate_task(loaded.model, loaded.tokenizer, records, labels or _labels_of(records),
                               max_new_tokens=max_new_tokens, task=task, metric_names=names,
                               calibration_bins=calibration_bins)
    except ValueError as e:  # e.g. --task classification on records without labels
        fail(str(e))
    table = Table(title=f"{model} on {data} ({result['n']} examples)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)
    if output:
        output.write_text(json.dumps(result, indent=2))
        out.print(f"wrote {output}")


def _check_eval_options(task: str, names: list[str] | None) -> None:
    """--task / --metrics checked as eval.task / eval.metrics are, before any model loads."""
    from pydantic import ValidationError

    from hone.config import EvalConfig

    try:
        EvalConfig(task=task, metrics=names)
    except ValidationError as e:
        messages = [f"--{err['loc'][0]}: {err['msg']}" if err["loc"] else
                    err["msg"].removeprefix("Value error, ").replace("eval.metrics", "--metrics")
                    .replace("eval.task", "--task") for err in e.errors()]
        fail("; ".join(messages))


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


@app.command()
def sweep(config: Path = typer.Argument(..., help="Run config (YAML) with a `sweep:` section (the search space)."),
          trials: Optional[int] = typer.Option(None, "--trials", help="Trials in the whole sweep (default: sweep.trials)."),
          out_dir: Optional[Path] = typer.Option(None, "--out", help="Sweep directory (default: OUTPUT_DIR/NAME-sweep)."),
          set_: list[str] = typer.Option([], "--set", help="Override a config key: --set train.max_steps=20")):
    """Hyperparameter search with Optuna: each trial a run directory; a ranked summary, a plot and best.yaml.
    Run it again to continue (finished trials are not rerun)."""
    from hone.config import ConfigError, load_config
    from hone.eval.sweep import plan_sweep, run_sweep
    from hone.train.loop import Interrupted

    quiet_libraries()
    try:
        plan = plan_sweep(load_config(config, set_), out=out_dir, trials=trials)
        result = run_sweep(plan, show_progress=True, echo=lambda m: out.print(m, highlight=False, markup=False))
    except (ConfigError, *user_errors()) as e:
        fail(str(e))
    except Interrupted as e:
        err.print("stopped; the trial keeps its checkpoint. Continue with the same command (same --out).")
        raise typer.Exit(128 + e.signum)
    _print_sweep(result)


def _print_sweep(result: dict) -> None:
    rows = result["rows"]
    table = Table(title=f"sweep: {len(rows)} trial(s)")
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    for col in ("rank", "trial", "state", *keys, (result["best"] or {}).get("metric") or "metric", "seconds"):
        table.add_column(col, justify="right" if col not in ("state",) else "left")
    def fmt(x) -> str:
        return "" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)

    for r in rows:
        table.add_row(fmt(r["rank"]), fmt(r["trial"]), r["state"], *[fmt(r["params"].get(k)) for k in keys],
                      fmt(r["value"]), fmt(r["seconds"]))
    out.print(table)
    for name, path in result["paths"].items():
        out.print(f"{name}: [bold]{path}[/bold]")


@app.command()
def compare(config: Path = typer.Argument(..., help="Run config (YAML): the same data and model.base as `hone train`."),
            set_: list[str] = typer.Option([], "--set", help="Override a config key: --set compare.k=8"),
            run: Optional[Path] = typer.Option(None, "--run", help=(
                "The fine-tuned run directory to compare (default: the config's own run; trained first if "
                "there is none).")),
            out_dir: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN_DIR/compare/).")):
    """Zero-shot, few-shot and retrieval prompting vs the fine-tuned model on the same held-out set:
    metrics, tokens, latency and cost per request, and a recommendation."""
    from hone.config import load_config
    from hone.eval.compare import rich_table, run_compare

    quiet_libraries()
    with training_errors():
        cfg = load_config(config, set_)
        result = run_compare(cfg, run=str(run) if run else None, out_dir=out_dir,
                             log=lambda msg: err.print(msg, style="dim", highlight=False, markup=False))
    out.print(rich_table(result))
    out.print(result["recommendation"], highlight=False, markup=False)
    out.print(f"report: [bold]{result['paths']['html']}[/bold] (and compare.md, compare.json)")


# service (issue 6): `hone api ...` and `hone worker`; the commands live in hone/service/cli.py
from hone.service.cli import api_app, worker_command  # noqa: E402

app.add_typer(api_app, name="api")
app.command("worker")(worker_command)


@app.command()
def review(run_a: str = typer.Argument(..., help="Model A: run directory, embedded name, HF directory or .gguf."),
           run_b: str = typer.Argument(..., help="Model B (the win rate is B's over A)."),
           data: Path = typer.Option(..., "--data", help="Prompts: any hone data file, preference pairs, or {\"prompt\"} rows."),
           out_file: Optional[Path] = typer.Option(None, "--out", help="Results (JSONL; default review-A-vs-B.jsonl)."),
           summary: bool = typer.Option(False, "--summary", help="Print the results so far; judge nothing."),
           export: Optional[Path] = typer.Option(None, "--export-pairs", help="Write decisive judgements as dpo pairs."),
           max_items: Optional[int] = typer.Option(None, help="Review at most this many prompts (the file's first)."),
           max_new_tokens: int = typer.Option(256, help="Longest generated answer."),
           seed: int = typer.Option(0, help="Seed of the per-item A/B order.")):
    """Blind side-by-side review: keys a / b / t (tie) / x (both bad), n note, q quit. Resumable."""
    from hone.eval import review as rv

    quiet_libraries()
    results_path = out_file or Path(f"review-{_slug(run_a)}-vs-{_slug(run_b)}.jsonl")
    try:
        rv.check_same_runs(rv.read_results(results_path), run_a, run_b, results_path)
        if not summary:
            items = rv.read_items(data, max_items)
            answers = rv.ensure_answers(items, [run_a, run_b], rv.answers_path(results_path), max_new_tokens,
                                        echo=lambda m: err.print(m, style="dim", highlight=False))
            rv.review_session(items, answers, run_a, run_b, results_path, seed=seed, console=out)
    except (rv.ReviewError, *user_errors()) as e:
        fail(str(e))
    results = rv.read_results(results_path)
    out.print(rv.summary_text(rv.summarize(results), run_a, run_b), highlight=False)
    out.print(f"results: [bold]{results_path}[/bold]")
    if export:
        written, skipped = rv.export_pairs(results, export)
        out.print(f"wrote {written} preference pair(s) to [bold]{export}[/bold] ({skipped} tie/both-bad/identical "
                  "skipped); train on them with method: dpo")


def _slug(model: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(model).name or model).strip("_") or "model"


@app.command("export")
def export_cmd(run: Path = typer.Argument(..., help="A finished hone run directory."),
               fmt: str = typer.Option(..., "--format", "-f", help="hf | peft | gguf | ollama"),
               out_dir: Optional[Path] = typer.Option(None, "--out", help="Export directory (default: "
                                                      "RUN/exports/FORMAT[-QUANT])."),
               quant: Optional[str] = typer.Option(None, help="GGUF type for gguf/ollama: f32 f16 bf16 q8_0 q5_1 "
                                                   "q5_0 q4_1 q4_0 (default f16)."),
               prompts: Optional[Path] = typer.Option(None, help="Parity prompts: .txt (one a line) or .jsonl "
                                                      "({messages} or {prompt}); default: built-in + held-out."),
               max_new_tokens: int = typer.Option(32, help="Greedy tokens generated per parity prompt."),
               check_only: bool = typer.Option(False, "--check-only", help="Write nothing: re-check the export "
                                               "already in --out (after copying or editing it).")):
    """Export a run (merged HF dir, peft adapter, GGUF, Ollama) and prove parity with the trained model.
    Exit 4 when the reloaded export does not match the trained model within the format's tolerance."""
    from hone.export import EXIT_PARITY_FAILED, ExportError, export_run

    quiet_libraries()
    try:
        result = export_run(run, fmt, out=out_dir, quant=quant, prompts_file=prompts,
                            max_new_tokens=max_new_tokens, check_only=check_only, log=lambda m: err.print(m, style="dim", highlight=False))
    except (ExportError, *user_errors()) as e:
        fail(str(e))
    lg, g = result["logits"], result["generation"]
    out.print(f"{fmt}{' ' + result['quant'] if result['quant'] else ''}: {result['out']} "
              f"({sum(result['files'].values()) / 1e6:,.1f} MB)")
    out.print(f"parity on {result['prompts']} prompts: max |logit diff| {lg['max_abs_diff']:.3g} "
              f"({lg['max_rel_diff']:.2e} of scale {lg['logit_scale']:.3g}), top-1 {lg['top1_agreement']:.4f}, "
              f"greedy identical {g['identical']}/{g['of']}, stop {result['stop']['export_stop_ids']}")
    if not result["passed"]:
        for f in result["failures"]:
            err.print(f"[bold red]parity failed:[/bold red] {f}", highlight=False)
        raise typer.Exit(EXIT_PARITY_FAILED)
    out.print("[bold green]parity passed[/bold green] (README.md and parity.json in the export)")


# --- end of commands ---


def main() -> None:  # python -m hone
    app()


if __name__ == "__main__":
    main()
