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


@data_app.callback()
def _stop_cleanly_on_sigterm() -> None:
    """SIGTERM (a scheduler stopping the job) unwinds like Ctrl-C: every stage's temporary output and the
    dedup disk index are removed on the way out, and the previous output files are left as they were."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def print_stage(report) -> None:
    """The one-paragraph summary every stage prints: what it wrote and the count arithmetic."""
    out.print(f"[bold]{report.stage}[/bold]: {escape(report.arithmetic())}", highlight=False)
    from hone.data.stage import rejects_path, report_path

    if report.stage == "split":
        for name, info in report.details["splits"].items():
            out.print(f"  {name}: {info['records']} records -> {escape(info['path'])}", highlight=False)
    else:
        out.print(f"  wrote {escape(report.output)} ({report.records_out} records), "
                  f"{escape(str(report_path(report.output)))}", highlight=False)
    if report.rejected_total:
        refused = (Path(report.output) / "split.rejects.jsonl" if report.stage == "split"
                   else rejects_path(report.output))
        out.print(f"  rejects with reasons: {escape(str(refused))}", highlight=False)


def option_errors(e, flags: dict[str, str] | None = None) -> str:
    """A pydantic ValidationError of stage options in the words of the command line: `--flag: problem`.
    Fields are named by their flag (`min_chars` -> `--min-chars`) unless `flags` maps them otherwise."""
    flags = flags or {}

    def flag(err) -> str:
        if not err["loc"]:
            return "options"
        name = str(err["loc"][0])
        return flags.get(name, "--" + name.replace("_", "-"))

    return "; ".join(f"{flag(err)}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())


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
        fail(option_errors(e))
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
        fail(option_errors(e))
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


@data_app.command("ingest")
def data_ingest(
    sources: list[Path] = typer.Argument(..., help="Files or folders: .jsonl/.csv/.parquet records, .txt/.md "
                                         "documents, .eml/.mbox e-mail, a Slack export folder, a tickets CSV."),
    out_file: Path = typer.Option(..., "--out", help="Write the records here (JSON Lines); rejects and report "
                                  "go next to it."),
    kind: str = typer.Option("auto", help="Source kind for every input: auto|records|docs|email|slack|tickets."),
    tickets: bool = typer.Option(False, "--tickets", help="Same as --kind tickets."),
    column: Optional[list[str]] = typer.Option(None, "--column", help="Tickets column mapping ROLE=COLUMN, "
                                               "repeatable; roles: question answer label customer id thread."),
    encoding: str = typer.Option("auto", help="Encoding of tickets CSVs and documents: auto (UTF-8, BOM, "
                                 "UTF-16, then cp1252) or a codec name such as cp1252."),
):
    """Turn raw exports (mail, chat, tickets, documents, records) into hone records with provenance."""
    import pydantic

    from hone.data.ingest import IngestOptions, ingest

    if tickets and kind not in ("auto", "tickets"):
        fail(f"--tickets conflicts with --kind {kind}")
    columns = {}
    for item in column or []:
        role, sep, name = item.partition("=")
        if not sep or not role.strip() or not name.strip():
            fail(f"--column {item!r}: expected ROLE=COLUMN, e.g. --column question=Body")
        columns[role.strip()] = name.strip()
    try:
        options = IngestOptions(kind="tickets" if tickets else kind, columns=columns, encoding=encoding)
    except pydantic.ValidationError as e:
        fail(option_errors(e, {"columns": "--column"}))
    try:
        report = ingest(sources, out_file, options)
    except user_errors() as e:
        fail(str(e))
    print_stage(report)


@data_app.command("clean")
def data_clean(
    inputs: list[Path] = typer.Argument(..., help="Record files (.jsonl/.csv/.parquet), e.g. from `hone data ingest`."),
    out_file: Path = typer.Option(..., "--out", help="Write the cleaned records here (JSON Lines); rejects and "
                                  "report go next to it."),
    min_chars: int = typer.Option(1, help="Reject records with fewer characters (all text fields) as too_short."),
    max_chars: Optional[int] = typer.Option(None, help="Reject records with more characters as too_long."),
    html: bool = typer.Option(True, "--html/--no-html", help="Convert fields that look like HTML to text."),
    fix_unicode: bool = typer.Option(True, "--fix-unicode/--no-fix-unicode", help="Repair mojibake with ftfy."),
    email: str = typer.Option("auto", help="Strip quoted replies and signatures: auto (records from e-mail), "
                              "always, never."),
):
    """Repair Unicode, tidy whitespace, HTML to text, strip e-mail quotes/signatures, filter by length."""
    import pydantic

    from hone.data.clean import CleanOptions, clean

    try:
        options = CleanOptions(min_chars=min_chars, max_chars=max_chars, html=html, fix_unicode=fix_unicode,
                               email=email)
    except pydantic.ValidationError as e:
        fail(option_errors(e))
    try:
        report = clean(inputs, out_file, options)
    except user_errors() as e:
        fail(str(e))
    print_stage(report)
    fixes = report.details.get("records_with_fix", {})
    out.print("  records fixed: " + ", ".join(f"{k} {v}" for k, v in fixes.items()), highlight=False)


@data_app.command("dedup")
def data_dedup(
    inputs: list[Path] = typer.Argument(..., help="Record files (.jsonl/.csv/.parquet)."),
    out_file: Path = typer.Option(..., "--out", help="Write the kept records here (JSON Lines); rejects and "
                                  "report (with the clusters) go next to it."),
    threshold: float = typer.Option(0.8, help="Estimated Jaccard similarity at or above which records are "
                                    "near duplicates."),
    num_perm: int = typer.Option(128, help="MinHash permutations (more: more accurate, slower)."),
    near: bool = typer.Option(True, "--near/--no-near", help="Also drop near duplicates (MinHash LSH)."),
    eval_files: Optional[list[Path]] = typer.Option(None, "--eval", help="Evaluation file, repeatable: records "
                                                   "matching one of its records are contaminated."),
    keep_contaminated: bool = typer.Option(False, "--keep-contaminated", help="Only flag contaminated records "
                                           "in the report instead of dropping them."),
    index: str = typer.Option("auto", "--index", help="Where the index of kept records lives: memory (fastest), "
                              "disk (SQLite next to the output, removed at the end: flat RAM for any input "
                              "size) or auto (disk above 200 MB of input)."),
):
    """Drop exact and near duplicates (kept: the first of each cluster) and records leaking eval sets."""
    import pydantic

    from hone.data.dedup import DedupOptions, dedup

    try:
        options = DedupOptions(threshold=threshold, num_perm=num_perm, near=near, eval_files=eval_files or [],
                               keep_contaminated=keep_contaminated, index=index)
    except pydantic.ValidationError as e:
        fail(option_errors(e, {"threshold": "--threshold", "num_perm": "--num-perm", "eval_files": "--eval",
                                "index": "--index"}))
    try:
        report = dedup(inputs, out_file, options)
    except user_errors() as e:
        fail(str(e))
    print_stage(report)
    d = report.details
    out.print(f"  clusters: {d['clusters_total']} (duplicate {d['duplicate']}, near_duplicate "
              f"{d['near_duplicate']}, conflicting_label {d['conflicting_label']})", highlight=False)
    if "contamination" in d:
        c = d["contamination"]
        action = "dropped" if c["action"] == "drop" else "flagged only"
        out.print(f"  contamination: {c['matches_total']} records match {c['eval_records_matched']} of "
                  f"{c['eval_unique']} distinct eval records ({action})", highlight=False)


@data_app.command("convert")
def data_convert(
    inputs: list[Path] = typer.Argument(..., help="Record files (.jsonl/.csv/.parquet), or .md/.txt documents "
                                        "and folders of them."),
    out_file: Path = typer.Option(..., "--out", help="Write the converted records here (JSON Lines); rejects "
                                  "and report go next to it."),
    to: str = typer.Option(..., "--to", help="qa: FAQ documents -> Q&A chats; chunks: documents -> pretraining "
                           "chunks; chat: threads -> conversations; routing: text+label -> chats with the label "
                           "set; preference: rated answers -> chosen/rejected pairs."),
    agent: Optional[list[str]] = typer.Option(None, "--agent", help="chat: who answers (assistant): e-mail, "
                                              "@domain or Slack user name/id; repeatable."),
    system: Optional[str] = typer.Option(None, help="chat: system prompt for every conversation."),
    chunk_size: int = typer.Option(1500, help="chunks: largest chunk (in --chunk-unit)."),
    chunk_overlap: int = typer.Option(200, help="chunks: overlap between consecutive chunks."),
    chunk_unit: str = typer.Option("chars", help="chunks: chars or tokens (of --tokenizer)."),
    tokenizer: str = typer.Option("smollm2-135m-instruct", help="chunks: model whose tokenizer counts tokens."),
    instruction: Optional[str] = typer.Option(None, help="routing: system prompt; {labels} becomes the label list."),
    label: Optional[list[str]] = typer.Option(None, "--label", help="routing: the label set (repeatable); "
                                              "default: every label found."),
    prompt_field: str = typer.Option("prompt", help="preference: the prompt field."),
    answer_field: Optional[list[str]] = typer.Option(None, "--answer-field", help="preference: answer field(s); "
                                                     "default answer, completion."),
    rating_field: str = typer.Option("rating", help="preference: the rating field."),
    pairs: str = typer.Option("best_worst", help="preference: best_worst (one pair per prompt) or all."),
    min_margin: float = typer.Option(0.0, help="preference: smallest rating difference for a pair."),
):
    """Turn one shape into another: FAQ docs -> Q&A, docs -> chunks, threads -> chats, labels -> routing,
    ratings -> preference pairs."""
    import pydantic

    from hone.data.convert import ConvertError, ConvertOptions, convert

    given = {"to": to, "agents": agent or [], "system": system, "chunk_size": chunk_size,
             "chunk_overlap": chunk_overlap, "chunk_unit": chunk_unit, "tokenizer": tokenizer, "labels": label or None,
             "prompt_field": prompt_field, "rating_field": rating_field, "pairs": pairs, "min_margin": min_margin}
    if instruction is not None:
        given["instruction"] = instruction
    if answer_field:
        given["answer_fields"] = answer_field
    try:
        options = ConvertOptions(**given)
    except pydantic.ValidationError as e:
        fail(option_errors(e, {"agents": "--agent", "labels": "--label", "answer_fields": "--answer-field"}))
    try:
        report = convert(inputs, out_file, options)
    except (*user_errors(), ConvertError) as e:
        fail(str(e))
    print_stage(report)


@data_app.command("synth")
def data_synth(
    inputs: list[Path] = typer.Argument(..., help="Documents: .md/.txt files or folders, or {\"text\"} record files."),
    out_file: Path = typer.Option(..., "--out", help="Write the kept Q&A records here (JSON Lines); rejected "
                                  "pairs (with reasons) and the report go next to it."),
    teacher: str = typer.Option("smollm2-135m-instruct", help="Local teacher: embedded name, model dir, .gguf "
                                "or run dir."),
    teacher_url: Optional[str] = typer.Option(None, help="OpenAI-compatible endpoint base URL (instead of a "
                                              "local teacher), e.g. https://api.openai.com/v1."),
    api_key: Optional[str] = typer.Option(None, envvar="HONE_TEACHER_API_KEY", help="Endpoint API key "
                                          "(or env HONE_TEACHER_API_KEY); never written to the report."),
    teacher_model: Optional[str] = typer.Option(None, help="Model name to ask the endpoint for."),
    pairs_per_chunk: int = typer.Option(3, help="Q&A pairs asked for per chunk."),
    chunk_chars: int = typer.Option(1500, help="Largest chunk given to the teacher, in characters."),
    min_support: float = typer.Option(0.7, help="Share of an answer's content words that must be in the chunk."),
    max_chunks: Optional[int] = typer.Option(None, help="Stop after this many chunks (a trial run)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Longest teacher output per chunk, in tokens "
                                                 "(default 64 per pair asked for)."),
    batch_size: int = typer.Option(4, help="Chunks at once: a local teacher's generation batch, or concurrent "
                                   "requests to an endpoint."),
):
    """Have a teacher model write Q&A pairs grounded in each document chunk; keep only supported answers."""
    import pydantic

    from hone.cli_common import quiet_libraries
    from hone.data.synth import SynthOptions, TeacherError, synth

    try:
        options = SynthOptions(teacher=teacher, teacher_url=teacher_url, api_key=api_key,
                               teacher_model=teacher_model, pairs_per_chunk=pairs_per_chunk,
                               chunk_chars=chunk_chars, min_support=min_support, max_chunks=max_chunks,
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    except pydantic.ValidationError as e:
        fail(option_errors(e))
    if not teacher_url:
        quiet_libraries()
    try:
        report = synth(inputs, out_file, options)
    except (*user_errors(), TeacherError) as e:
        fail(str(e))
    print_stage(report)
    d = report.details
    out.print(f"  documents {d['documents']}, chunks {d['chunks']}, pairs generated {d['pairs_generated']}, "
              f"kept {d['pairs_kept']} (acceptance {d['acceptance_rate']}), "
              f"{d['seconds_per_chunk']} s per chunk", highlight=False)


@data_app.command("redact")
def data_redact(inputs: list[Path] = typer.Argument(..., help="Record files (.jsonl/.csv/.parquet)."),
                out_file: Path = typer.Option(..., "--out", help="Output JSONL (+ .rejects.jsonl, .report.json)."),
                mode: str = typer.Option("mask", help="mask (<EMAIL>), pseudonym (<EMAIL_1>, same value -> "
                                         "same name in the run) or drop (reject records holding PII)."),
                types: Optional[str] = typer.Option(None, help="Comma-separated PII types (default: all): "
                                                    "EMAIL,PHONE,CREDIT_CARD,IBAN,IP_ADDRESS,US_SSN,UK_NINO,"
                                                    "NATIONAL_ID,URL_WITH_TOKEN,SECRET,PERSON."),
                allow: Optional[list[str]] = typer.Option(None, help="A value never to redact (repeatable), "
                                                          "e.g. your own support@ address."),
                threshold: float = typer.Option(0.5, help="Minimum detector score, 0-1."),
                engine: str = typer.Option("auto", help="auto (Presidio if it starts, else regex), presidio, "
                                           "or regex."),
                ner_model: Optional[str] = typer.Option(None, help="Installed spaCy pipeline (name or path) "
                                                        "for PERSON anywhere; default: names in clear contexts.")):
    """Find PII (e-mail, phone, cards, IBAN, IP, national IDs, tokened URLs, secrets, names) and redact it."""
    from pydantic import ValidationError

    from hone.data.redact import RedactOptions, redact

    try:
        fields = {"mode": mode, "threshold": threshold, "allow": allow or [], "engine": engine,
                  "ner_model": ner_model}
        if types:
            fields["types"] = [t for t in types.split(",") if t.strip()]
        options = RedactOptions(**fields)
    except ValidationError as e:
        fail(option_errors(e))
    try:
        report = redact(inputs, out_file, options)
    except user_errors() as e:
        fail(str(e))
    print_stage(report)
    d = report.details
    found = ", ".join(f"{t} {n}" for t, n in d["spans_found"].items() if n) or "none"
    out.print(f"  PII spans found ({d['engine']} engine): {escape(found)}; "
              f"{d['records_changed']} records changed", highlight=False)
    if d.get("engine_note"):
        out.print(f"  note: {escape(d['engine_note'])}", highlight=False)


# --- end of commands ---
