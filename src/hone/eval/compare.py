"""`hone compare CONFIG.yaml`: was fine-tuning worth it? Prompting, retrieval and the tuned model, measured.

The same held-out set (the config's data.validation, or the split `hone train` carves) goes through each
strategy in compare.strategies (see hone.eval.baselines): zero-shot and few-shot prompting and
retrieval-augmented prompting of the base model, the fine-tuned model with its bare prompt, and optionally
the fine-tuned model with retrieval. Each is scored by `hone.eval.runners.evaluate_task`, so the metrics
match `hone train`'s report, and measured for prompt and output tokens, seconds per request and cost per
1,000 requests. A paired bootstrap over the held-out examples says whether a difference is more than noise,
and the recommendation is drawn from those numbers.

    from hone.eval.compare import run_compare
    result = run_compare(cfg, run="runs/my-run")   # writes compare.json, compare.md, compare.html, plots

The fine-tuned model is the run `--run DIR` (or compare.run) names, else the config's own run directory when
it exists and succeeded; failing both, the config is trained first with the normal `hone train` pipeline.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from hone.eval import baselines as B
from hone.eval.metrics import match_label, token_f1

METRIC_LABELS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "exact_match": "exact match",
                 "token_f1": "token F1", "invalid": "invalid", "ece": "ECE", "rougeL": "ROUGE-L",
                 "field_f1": "field F1"}
# Table columns beside the primary metric, when the evaluation reports them.
SECONDARY = {True: ("macro_f1", "invalid", "ece"), False: ("exact_match", "rougeL", "field_f1")}
SAME_RUN_KEYS = ("model", "data", "method", "adapter", "lora", "train")  # what makes a run "this config's"


# --- which fine-tuned run --------------------------------------------------------------------------------


def _status(run_dir: Path) -> str | None:
    path = run_dir / "manifest.json"
    try:
        return json.loads(path.read_text()).get("status") if path.is_file() else None
    except json.JSONDecodeError:
        return None


def checked_run(path: str | Path) -> Path:
    """A finished hone run directory, or a RunError saying what is wrong with it."""
    from hone.train.run import RunError

    p = Path(path)
    if not (p / "config.yaml").is_file() or not (p / "final").is_dir():
        raise RunError(f"{p}: not a finished hone run directory (expected config.yaml and final/)")
    status = _status(p)
    if status != "succeeded":
        raise RunError(f"{p}: the run's status is '{status}', not succeeded; finish it with "
                       "`hone train CONFIG --resume` or compare another run with --run DIR")
    return p


def find_run(cfg, explicit: str | None = None) -> Path | None:
    """The fine-tuned run to compare: `explicit` (--run), compare.run, output_dir/name, or (for a config
    without a name) the newest succeeded run directory trained with this config's model, data and method.
    None when there is none yet."""
    from hone.train.run import RunError

    if explicit or cfg.compare.run:
        return checked_run(explicit or cfg.compare.run)
    root = Path(cfg.output_dir)
    if cfg.name:
        p = root / cfg.name
        if not p.exists():
            return None
        if _status(p) != "succeeded":
            raise RunError(f"{p} exists but its status is '{_status(p)}': finish it with `hone train CONFIG "
                           "--resume`, or compare another run with --run DIR")
        return checked_run(p)
    base = f"{Path(cfg.data.prepare or cfg.data.train).stem}-{cfg.method}"
    found = [p for p in root.glob(f"{base}*") if p.name == base or p.name[len(base) + 1:].isdigit()]
    for p in sorted(found, key=lambda p: p.stat().st_mtime, reverse=True):
        if _status(p) == "succeeded" and (p / "config.yaml").is_file() and not config_differences(p, cfg):
            return p
    return None


def config_differences(run_dir: Path, cfg) -> list[str]:
    """The config sections (model, data, method, lora, train ...) a run was trained with differently."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    now = cfg.model_dump(mode="json")
    return [k for k in SAME_RUN_KEYS if saved.get(k) != now.get(k)]


def ensure_run(cfg, explicit: str | None, show_progress: bool, log) -> Path:
    """find_run, or train the config with `hone train`'s own pipeline when there is no run yet."""
    from hone.train.run import run_training

    found = find_run(cfg, explicit)
    if found is not None:
        log(f"fine-tuned model: {found}")
        differ = config_differences(found, cfg)
        if differ:
            log(f"note: {found} was trained with other {', '.join(differ)} settings than this config; the "
                "held-out set and prompts come from this config")
        return found
    log("no finished run for this config yet: training it first (as `hone train` would)")
    return run_training(cfg, show_progress=show_progress).run_dir


def training_summary(run_dir: Path | None) -> dict | None:
    if run_dir is None:
        return None
    manifest = json.loads((run_dir / "manifest.json").read_text())
    t = manifest.get("training") or {}
    return {"run_dir": str(run_dir), "seconds": t.get("seconds"), "steps": t.get("steps"),
            "method": t.get("method"), "device": t.get("device")}


# --- numbers ---------------------------------------------------------------------------------------------


def per_example_scores(outputs: list[str], convs: list, labels: list[str] | None, label_task: bool) -> list[float]:
    """The primary metric per example (1/0 label correctness, or token F1): what the bootstrap resamples."""
    if label_task:
        return [float(match_label(o, labels) == c.label) for o, c in zip(outputs, convs)]
    return [token_f1(o, c.reference()) for o, c in zip(outputs, convs)]


def _resampled_means(values: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Means of `samples` bootstrap resamples of the rows of `values` (examples x series), in chunks so a
    large held-out set does not need samples x n memory at once."""
    rng = np.random.default_rng(seed)
    n = values.shape[0]
    out = []
    for start in range(0, samples, 256):
        idx = rng.integers(0, n, size=(min(256, samples - start), n))
        out.append(values[idx].mean(axis=1))
    return np.concatenate(out)


def bootstrap_interval(scores: list[float], *, samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean score."""
    if not scores:
        return (math.nan, math.nan)
    means = _resampled_means(np.asarray(scores, dtype=float)[:, None], samples, seed)[:, 0]
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def paired_bootstrap(a: list[float], b: list[float], *, samples: int, confidence: float, seed: int) -> dict:
    """Mean of a - b over the same examples and its percentile interval, resampling examples (pairs stay
    together, so what the two share cancels out). The difference is noise when the interval holds 0."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_bootstrap: {len(a)} and {len(b)} scores")
    pairs = np.asarray([a, b], dtype=float).T
    means = _resampled_means(pairs, samples, seed)
    diffs = means[:, 0] - means[:, 1]
    tail = 100 * (1 - confidence) / 2
    low, high = float(np.percentile(diffs, tail)), float(np.percentile(diffs, 100 - tail))
    return {"diff": float(np.mean(a) - np.mean(b)), "low": low, "high": high,
            "noise": bool(low <= 0 <= high), "confidence": confidence}


def cost_per_1k(prompt_tokens: float, output_tokens: float, latency: float, prices) -> dict:
    """Cost of 1,000 requests: tokens at the per-million prices, plus (price_per_hour set) the machine's
    time at the measured seconds per request."""
    tokens = 1000 * (prompt_tokens * prices.price_per_million_input_tokens
                     + output_tokens * prices.price_per_million_output_tokens) / 1e6
    hardware = 1000 * latency * prices.price_per_hour / 3600 if prices.price_per_hour else 0.0
    return {"tokens": tokens, "hardware": hardware, "total": tokens + hardware}


# --- the recommendation ----------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pts(x: float) -> str:
    return f"{round(100 * x, 1) + 0.0:+.1f}"


def _best(rows: list[dict]) -> dict:
    """Highest primary score; ties go to the cheaper, then the shorter prompt."""
    return max(rows, key=lambda r: (round(r["primary"], 9), -r["cost_per_1k"]["total"],
                                    -r["prompt_tokens_per_request"]))


def savings(ft: dict, other: dict) -> list[str]:
    """How `ft` compares with `other` on prompt tokens, latency and cost, in words."""
    out = []
    p_ft, p_o = ft["prompt_tokens_per_request"], other["prompt_tokens_per_request"]
    if p_o > 0:
        change = 1 - p_ft / p_o
        out.append(f"{abs(change):.0%} {'fewer' if change >= 0 else 'more'} prompt tokens")
    l_ft, l_o = ft["latency_per_request"], other["latency_per_request"]
    if l_ft > 0 and l_o > 0:
        ratio = l_o / l_ft
        out.append(f"{ratio:.1f}x lower latency" if ratio >= 1 else f"{1 / ratio:.1f}x higher latency")
    c_ft, c_o = ft["cost_per_1k"]["total"], other["cost_per_1k"]["total"]
    if c_o > 0:
        change = 1 - c_ft / c_o
        out.append(f"{abs(change):.0%} {'lower' if change >= 0 else 'higher'} cost per 1,000 requests")
    return out


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _interval(d: dict) -> str:
    return f"{d['confidence']:.0%} interval {_pts(d['low'])} to {_pts(d['high'])} points"


def recommend(rows: list[dict], *, primary: str, samples: int = 2000, confidence: float = 0.95, seed: int = 0,
              training: dict | None = None) -> dict:
    """The plain-words recommendation and the comparisons behind it, from rows with: strategy, title,
    primary, scores (per example), prompt_tokens_per_request, latency_per_request, cost_per_1k{total}.

    The fine-tuned model (the better of fine_tuned / fine_tuned_retrieval) is set against the best
    prompting strategy; a paired bootstrap decides whether the gap is more than noise.
    """
    def diff(a, b):
        return paired_bootstrap(a["scores"], b["scores"], samples=samples, confidence=confidence, seed=seed)

    metric = METRIC_LABELS.get(primary, primary)
    n = len(rows[0]["scores"])
    tuned = [r for r in rows if r["strategy"] in B.FINE_TUNED]
    prompting = [r for r in rows if r["strategy"] in B.PROMPTING]
    if not tuned or not prompting:
        best = _best(rows)
        return {"verdict": "best", "comparisons": [], "text":
                f"Best of the strategies run: {best['title']} ({_pct(best['primary'])} {metric} on {n} examples). "
                "Add both a prompting and a fine-tuned strategy to compare.strategies for a recommendation."}
    ft, p = _best(tuned), _best(prompting)
    d = diff(ft, p)
    comparisons = [{"a": ft["strategy"], "b": p["strategy"], **d}]
    words = _join(savings(ft, p))
    if d["low"] > 0:
        verdict = "fine_tune"
        text = (f"Fine-tune. {_cap(ft['title'])}: {_pts(d['diff'])} points {metric}, {words} than {p['title']}, the "
                f"best prompting strategy ({_pct(ft['primary'])} vs {_pct(p['primary'])} on {n} held-out "
                f"examples; {_interval(d)}).")
    elif d["high"] < 0:
        verdict = "prompt"
        text = (f"Prompting wins: {p['title']} scores {_pct(p['primary'])} {metric}, {_pts(-d['diff'])} points "
                f"above {ft['title']} ({_pct(ft['primary'])}; {_interval(d)} on {n} examples), so this "
                f"fine-tuning does not pay on quality. The tuned model would still mean {words}; more "
                "data, more steps or a larger model may change that.")
    else:
        verdict = "within_noise"
        text = (f"Within noise: {ft['title']} ({_pct(ft['primary'])}) and {p['title']} ({_pct(p['primary'])}) "
                f"differ by {_pts(d['diff'])} points of {metric}, and the {_interval(d)} includes 0 on {n} "
                "examples, so prompting is as good on quality.")
        cheaper = ft["cost_per_1k"]["total"] < p["cost_per_1k"]["total"] or (
            ft["prompt_tokens_per_request"] < p["prompt_tokens_per_request"])
        text += (f" Fine-tuning's case is cost: {words} than {p['title']}." if cheaper
                 else f" {_cap(p['title'])} needs no training: prefer it.")
    text += _side_notes(rows, ft, p, metric, diff, comparisons)
    text += _training_note(training, ft, p)
    return {"verdict": verdict, "comparisons": comparisons, "text": text}


def _side_notes(rows, ft, p, metric, diff, comparisons) -> str:
    """A cheaper prompting strategy as good as the best one; what retrieval adds to the tuned model."""
    text = ""
    for r in sorted(rows, key=lambda r: r["prompt_tokens_per_request"]):
        if r["strategy"] in B.PROMPTING and r is not p and r["prompt_tokens_per_request"] < p["prompt_tokens_per_request"]:
            d = diff(p, r)
            comparisons.append({"a": p["strategy"], "b": r["strategy"], **d})
            if d["noise"]:
                text += (f" Among prompting strategies, {r['title']} is within noise of {p['title']} "
                         f"({_pct(r['primary'])} vs {_pct(p['primary'])}) with fewer prompt tokens.")
                break
    both = {r["strategy"]: r for r in rows if r["strategy"] in B.FINE_TUNED}
    if len(both) == 2:
        d = diff(both["fine_tuned_retrieval"], both["fine_tuned"])
        comparisons.append({"a": "fine_tuned_retrieval", "b": "fine_tuned", **d})
        effect = "within noise" if d["noise"] else ("a real gain" if d["diff"] > 0 else "a real loss")
        text += (f" Retrieval on top of the fine-tuned model: {_pts(d['diff'])} points {metric} ({effect}; "
                 f"{_interval(d)}).")
    return text


def _training_note(training: dict | None, ft: dict, p: dict) -> str:
    if not training or not training.get("seconds"):
        return ""
    text = f" Training took {training['seconds']:.0f} s (once)"
    cost = training.get("cost")
    saving = (p["cost_per_1k"]["total"] - ft["cost_per_1k"]["total"]) / 1000
    if cost and saving > 0:
        text += f", about {cost:.4g} in machine time, repaid after ~{math.ceil(cost / saving):,} requests"
    return text + "."


# --- running the strategies ------------------------------------------------------------------------------


def validate(cfg):
    """Data and options checked before any model loads (file:line problems, k, the encoder's presence)."""
    from hone.methods.contrastive import encoder_source
    from hone.train.prepare import validate_data

    data = validate_data(cfg.data, cfg.train.seed)
    B.check_k(cfg.compare.strategies, cfg.compare.k, len(data.train), cfg.data.train)
    if any(s in B.RETRIEVING for s in cfg.compare.strategies):
        encoder_source(cfg.compare.embedding_model)  # a ModelError now, not after minutes of generation
    return data


def scorable(held_out: list, tokenizer, cfg) -> list:
    """The held-out conversations `hone train` scores: those with an answer left after truncation."""
    from hone.data.template import ensure_chat_template, render_with_loss_mask

    ensure_chat_template(tokenizer)
    return [c for c in held_out if render_with_loss_mask(tokenizer, c, loss_on=cfg.data.loss_on,
                                                          max_seq_len=cfg.data.max_seq_len).n_targets > 0]


def retrieve(cfg, train: list, held_out: list) -> tuple[list[list[int]], dict]:
    """The compare.k nearest training examples per held-out query, and what retrieval cost in time."""
    from hone.methods.contrastive import load_encoder

    encoder = load_encoder(cfg.compare.embedding_model)
    start = time.perf_counter()
    corpus = encoder.encode([B.query_text(c) for c in train])
    index_seconds = time.perf_counter() - start
    start = time.perf_counter()
    neighbours = B.nearest(encoder.encode([B.query_text(c) for c in held_out]), corpus, cfg.compare.k)
    per_query = (time.perf_counter() - start) / max(1, len(held_out))
    return neighbours, {"embedding_model": cfg.compare.embedding_model, "index_seconds": index_seconds,
                        "seconds_per_request": per_query, "train_examples": len(train)}


def eval_options(cfg) -> dict:
    """The eval.* options `hone train` passes to evaluate_task (task, metrics, calibration bins), limited to
    those this version of evaluate_task takes, so the metrics match the run's report."""
    import inspect

    from hone.eval.runners import evaluate_task

    wanted = {"task": getattr(cfg.eval, "task", None), "metric_names": getattr(cfg.eval, "metrics", None),
              "calibration_bins": getattr(cfg.eval, "calibration_bins", None)}
    takes = inspect.signature(evaluate_task).parameters
    return {k: v for k, v in wanted.items() if k in takes and v is not None}


def score_strategy(strategy: str, model, tokenizer, convs: list, labels, cfg, extra_seconds: float = 0.0) -> dict:
    """One table row: evaluate_task's metrics plus tokens, latency (with retrieval time) and cost."""
    from hone.eval.runners import evaluate_task
    from hone.train.device import pick_device, use_bf16

    bf16 = use_bf16(pick_device(), cfg.train.precision)
    result = evaluate_task(model, tokenizer, convs, labels, max_new_tokens=cfg.eval.max_new_tokens,
                           batch_size=cfg.eval.batch_size, bf16=bf16, **eval_options(cfg))
    m = result["metrics"]
    label_task = result.get("task") == "label"
    latency = m["latency_per_request"] + extra_seconds
    # The primary score per example (what the bootstrap resamples); its mean is accuracy / token F1 exactly.
    scores = per_example_scores(result["outputs"], convs, labels, label_task)
    return {"strategy": strategy, "title": B.title(strategy, cfg.compare.k),
            "model": "tuned" if strategy in B.FINE_TUNED else "base", "label_task": label_task,
            "metrics": m, "primary": sum(scores) / max(1, len(scores)),
            "primary_ci": bootstrap_interval(scores, samples=cfg.compare.bootstrap_samples,
                                             confidence=cfg.compare.confidence, seed=cfg.train.seed),
            "prompt_tokens_per_request": m["prompt_tokens_per_request"],
            "output_tokens_per_request": m["output_tokens_per_request"],
            "generation_seconds_per_request": m["latency_per_request"], "retrieval_seconds_per_request": extra_seconds,
            "latency_per_request": latency,
            "cost_per_1k": cost_per_1k(m["prompt_tokens_per_request"], m["output_tokens_per_request"], latency,
                                       cfg.compare),
            "scores": scores, "outputs": result["outputs"], "confusion": result.get("confusion")}


def _load(name: str, cfg, log):
    from hone.models.load import load_model
    from hone.train.device import pick_device

    log(f"loading {name}")
    loaded = load_model(name, allow_download=cfg.model.allow_download,
                        trust_remote_code=cfg.model.trust_remote_code)
    loaded.model.to(pick_device())
    return loaded


def run_strategies(cfg, data, run_dir: Path | None, log) -> tuple[list[dict], list, dict | None, list[int]]:
    """Every configured strategy over the same held-out conversations, in a fixed order (base model first)."""
    order = [s for s in B.PROMPTING + B.FINE_TUNED if s in cfg.compare.strategies]
    labels = data.labels or None
    base = _load(cfg.model.base, cfg, log) if any(s in B.PROMPTING for s in order) else None
    tuned = None
    if base is None:
        tuned = _load(str(run_dir), cfg, log)
    held_out = scorable(data.held_out, (base or tuned).tokenizer, cfg)
    picked = B.pick_few_shot(data.train, cfg.compare.k, cfg.train.seed) if "few_shot" in order else []
    neighbours, retrieval = [], None
    if any(s in B.RETRIEVING for s in order):
        log(f"embedding {len(data.train)} training examples with {cfg.compare.embedding_model}")
        neighbours, retrieval = retrieve(cfg, data.train, held_out)
    rows = []
    for strategy in order:
        if strategy in B.FINE_TUNED and tuned is None:
            base = loaded = None  # free the base model before the tuned one loads
            tuned = _load(str(run_dir), cfg, log)
        loaded = tuned if strategy in B.FINE_TUNED else base
        convs = B.strategy_prompts(strategy, held_out, data.train, instruction=cfg.compare.instruction or
                                   cfg.data.instruction, labels=labels, picked=picked, neighbours=neighbours)
        log(f"{B.title(strategy, cfg.compare.k)}: {len(convs)} held-out examples")
        extra = retrieval["seconds_per_request"] if strategy in B.RETRIEVING else 0.0
        rows.append(score_strategy(strategy, loaded.model, loaded.tokenizer, convs, labels, cfg, extra))
        log(f"  {rows[-1]['title']}: {_pct(rows[-1]['primary'])}, {rows[-1]['prompt_tokens_per_request']:.0f} "
            f"prompt tokens, {rows[-1]['latency_per_request']:.3f} s per request")
    return rows, held_out, retrieval, picked


def run_compare(cfg, *, run: str | None = None, out_dir: str | Path | None = None, show_progress: bool = True,
                log=print) -> dict:
    """Run the comparison and write compare.json / .md / .html and plots; returns the result with "paths"."""
    if cfg.data.prepare:  # as `hone train` does: the recipe's files become data.train / data.validation
        from hone.train.run import run_prepare_stage

        cfg = run_prepare_stage(cfg)
    data = validate(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    needs_tuned = any(s in B.FINE_TUNED for s in cfg.compare.strategies)
    run_dir = ensure_run(cfg, run, show_progress, log) if needs_tuned else None
    torch.manual_seed(cfg.train.seed)
    rows, held_out, retrieval, picked = run_strategies(cfg, data, run_dir, log)
    label_task = rows[0]["label_task"]
    primary = "accuracy" if label_task else "token_f1"
    training = training_summary(run_dir)
    if training and cfg.compare.price_per_hour and training.get("seconds"):
        training["cost"] = training["seconds"] / 3600 * cfg.compare.price_per_hour
    advice = recommend(rows, primary=primary, samples=cfg.compare.bootstrap_samples,
                       confidence=cfg.compare.confidence, seed=cfg.train.seed, training=training)
    result = {"n": len(held_out), "task": "label" if label_task else "generation", "primary": primary,
              "labels": data.labels or None, "k": cfg.compare.k, "model": cfg.model.base,
              "run_dir": str(run_dir) if run_dir else None, "training": training, "retrieval": retrieval,
              "few_shot_examples": [data.train[i].where for i in picked],
              "prices": {k: getattr(cfg.compare, k) for k in ("price_per_million_input_tokens",
                                                               "price_per_million_output_tokens", "price_per_hour")},
              "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens,
              "confidence": cfg.compare.confidence, "strategies": rows, "comparisons": advice["comparisons"],
              "verdict": advice["verdict"], "recommendation": advice["text"],
              "examples": example_rows(held_out, rows, cfg.eval.examples_in_report)}
    out = Path(out_dir) if out_dir else default_out_dir(cfg, run_dir)
    result["paths"] = {k: str(v) for k, v in write_compare(result, out).items()}
    return result


def default_out_dir(cfg, run_dir: Path | None) -> Path:
    if run_dir is not None:
        return run_dir / "compare"
    name = cfg.name or f"{Path(cfg.data.prepare or cfg.data.train).stem}-{cfg.method}"
    return Path(cfg.output_dir) / f"{name}-compare"


def example_rows(held_out: list, rows: list[dict], n: int) -> list[dict]:
    """The first n held-out queries: the query, the reference and every strategy's answer."""
    return [{"query": B.query_text(c), "reference": c.reference(),
             "answers": {r["strategy"]: r["outputs"][i] for r in rows}} for i, c in enumerate(held_out[:n])]


# --- the report: compare.json, compare.md, compare.html, plots, the terminal table -----------------------


def table_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the one comparison table, as display strings (shared by md, html and rich)."""
    primary = result["primary"]
    first = result["strategies"][0]["metrics"]
    extra = [k for k in SECONDARY[result["task"] == "label"] if k in first]
    level = f"{result['confidence']:.0%}"
    header = ["strategy", f"{METRIC_LABELS[primary]} ({level} CI)", *[METRIC_LABELS[k] for k in extra],
              "prompt tok/req", "output tok/req", "latency/req", "cost/1k req"]
    rows = []
    for r in result["strategies"]:
        lo, hi = r["primary_ci"]
        cells = [r["title"], f"{_pct(r['primary'])} ({_pct(lo)}-{_pct(hi)})"]
        for k in extra:
            v = r["metrics"].get(k)
            cells.append("n/a" if v is None else str(v) if isinstance(v, int) else f"{v:.3f}" if k == "ece"
                         else _pct(v))
        cells += [f"{r['prompt_tokens_per_request']:,.1f}", f"{r['output_tokens_per_request']:.1f}",
                  f"{r['latency_per_request']:.3f} s", f"{r['cost_per_1k']['total']:.4f}"]
        rows.append(cells)
    return header, rows


def _bar_plot(result: dict, key: str, ylabel: str, path: Path, percent: bool) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["strategies"]
    fig = Figure(figsize=(max(5.0, 1.5 * len(rows) + 1.5), 4.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    scale = 100 if percent else 1
    heights = [scale * r[key] for r in rows]
    colors = ["#2b6cb0" if r["strategy"] in B.FINE_TUNED else "#9aa5b1" for r in rows]
    err = None
    if percent:  # the bootstrap interval as error bars
        err = [[h - scale * r["primary_ci"][0] for h, r in zip(heights, rows)],
               [scale * r["primary_ci"][1] - h for h, r in zip(heights, rows)]]
    bars = ax.bar(range(len(rows)), heights, color=colors, yerr=err, capsize=4)
    ax.bar_label(bars, labels=[f"{h:.1f}" if percent else f"{h:,.0f}" for h in heights], padding=2, fontsize=9)
    ax.set_xticks(range(len(rows)), [r["title"] for r in rows], rotation=15)
    ax.set(ylabel=ylabel, title=f"{ylabel} on {result['n']} held-out examples")
    ax.set_ylim(0, 110 if percent else max(1.0, max(heights) * 1.15))  # room for the bar labels
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)
    return path


def _method_notes(result: dict) -> list[str]:
    p = result["prices"]
    notes = [f"Held-out: {result['n']} examples ({result['task']} task); greedy decoding, batches of "
             f"{result['batch_size']}, at most {result['max_new_tokens']} new tokens. Intervals: paired "
             "percentile bootstrap over examples.",
             "Latency per request: batched generation wall time / requests (plus, for retrieval, embedding the "
             "query and the nearest-neighbour search); the fine-tuned model runs with its adapter unmerged.",
             f"Cost per 1,000 requests: prompt tokens x {p['price_per_million_input_tokens']} + output tokens x "
             f"{p['price_per_million_output_tokens']} per 1M tokens"
             + (f", plus machine time at {p['price_per_hour']} per hour." if p["price_per_hour"] else ".")]
    if result.get("retrieval"):
        r = result["retrieval"]
        notes.append(f"Retrieval: {r['embedding_model']}, cosine similarity; indexing {r['train_examples']} "
                     f"training examples took {r['index_seconds']:.1f} s (once).")
    if result.get("training"):
        t = result["training"]
        notes.append(f"Fine-tuned model: {t['run_dir']} ({t.get('method')}, {t.get('steps')} steps, "
                     f"{(t.get('seconds') or 0):.0f} s of training).")
    return notes


def render_markdown(result: dict, plots: dict[str, str]) -> str:
    header, rows = table_rows(result)
    cell = lambda x: str(x).replace("|", "\\|").replace("<", "&lt;").replace("\n", " ")  # noqa: E731
    out = ["# hone compare", "", f"**{cell(result['recommendation'])}**", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    out += [""] + [f"![{k}]({v})" for k, v in plots.items()] + ["", "## How these numbers were measured", ""]
    out += [f"- {cell(n)}" for n in _method_notes(result)]
    if result["examples"]:
        titles = {r["strategy"]: r["title"] for r in result["strategies"]}
        out += ["", "## Examples", "", "| query | reference | " + " | ".join(titles.values()) + " |",
                "|" + "---|" * (2 + len(titles))]
        out += ["| " + " | ".join(cell(x) for x in [e["query"], e["reference"],
                                                     *(e["answers"][s] for s in titles)]) + " |"
                for e in result["examples"]]
    return "\n".join(out) + "\n"


def render_html(result: dict, plots: dict[str, Path]) -> str:
    import base64
    from html import escape

    header, rows = table_rows(result)
    th = "".join(f"<th>{escape(h)}</th>" for h in header)
    trs = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    imgs = "".join(f'<img alt="{escape(k)}" src="data:image/png;base64,'
                   f'{base64.b64encode(Path(p).read_bytes()).decode("ascii")}">' for k, p in plots.items())
    notes = "".join(f"<li>{escape(n)}</li>" for n in _method_notes(result))
    examples = ""
    if result["examples"]:
        titles = {r["strategy"]: r["title"] for r in result["strategies"]}
        head = "".join(f"<th>{escape(t)}</th>" for t in ["query", "reference", *titles.values()])
        body = "".join("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in [e["query"], e["reference"],
                       *(e["answers"][s] for s in titles)]) + "</tr>" for e in result["examples"])
        examples = f"<h2>Examples</h2><table><tr>{head}</tr>{body}</table>"
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:left}.rec{background:#eef5ff;padding:1em;border-left:4px solid #2b6cb0}"
             "img{max-width:49%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>hone compare</title><style>{style}"
            f"</style></head><body><h1>hone compare</h1><p class='rec'>{escape(result['recommendation'])}</p>"
            f"<table><tr>{th}</tr>{trs}</table>{imgs}<h2>How these numbers were measured</h2><ul>{notes}</ul>"
            f"{examples}</body></html>\n")


def write_compare(result: dict, out_dir: Path) -> dict[str, Path]:
    """compare.json, compare.md, compare.html and the two bar plots in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"primary": _bar_plot(result, "primary", METRIC_LABELS[result["primary"]] + " (%)",
                                  out_dir / "compare_primary.png", percent=True),
             "prompt_tokens": _bar_plot(result, "prompt_tokens_per_request", "prompt tokens per request",
                                        out_dir / "compare_prompt_tokens.png", percent=False)}
    paths = {"json": out_dir / "compare.json", "md": out_dir / "compare.md", "html": out_dir / "compare.html"}
    paths["json"].write_text(json.dumps(result, indent=2, default=str), encoding="utf-8")
    paths["md"].write_text(render_markdown(result, {k: p.name for k, p in plots.items()}), encoding="utf-8")
    paths["html"].write_text(render_html(result, plots), encoding="utf-8")
    return {**paths, **plots}


def rich_table(result: dict):
    """The comparison table for the terminal."""
    from rich.table import Table

    header, rows = table_rows(result)
    table = Table(title=f"hone compare: {result['n']} held-out examples")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    return table
