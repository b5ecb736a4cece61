"""Write a run's report: report.md, a self-contained report.html and plots/*.png in the run directory.

The report is the evidence a run produces, so it leads with a verdict computed from the held-out numbers
("beats the base by +41.7 points of accuracy ..." or, honestly, "did not improve") and then shows how it got
there: training summary, data counts (truncated/skipped/rejected always shown), loss curves, base vs tuned
metrics, the tuned model's confusion matrix for label tasks, side-by-side examples and the full config.

    from hone.eval.report import write_report
    paths = write_report(Path("runs/my-run"), info)   # info: see write_report's docstring

Optional parts (eval disabled, no validation rows, no base results) are left out rather than failing: a
report must never turn a finished training run into a crash. Plots use matplotlib's Agg canvas directly
(no pyplot), so nothing global changes and it is safe inside the service's worker threads.
"""

from __future__ import annotations

import base64
import json
import math
import re
from importlib import resources
from pathlib import Path

import jinja2
import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from hone.eval.analysis import failure_view
from hone.eval.metrics import INVALID, exact_match, label_key, match_label, token_f1

FRACTION_METRICS = ("accuracy", "macro_f1", "exact_match", "token_f1", "precision", "recall", "f1", "mrr",
                    "agreement", "ece")
LOWER_IS_BETTER = ("seconds", "perplexity", "invalid", "loss", "latency", "tokens_per_request")
LOWER_IS_BETTER_WORDS = ("ece", "brier")  # whole words of a key only: "ece" is inside unrelated words
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "exact_match": "exact match",
                "token_f1": "token F1", "seconds": "eval seconds", "invalid": "invalid answers",
                "micro_f1": "micro-F1", "ece": "ECE (calibration error)", "brier": "Brier score",
                "prob_accuracy": "accuracy from label scores", "bleu": "BLEU", "chrf": "chrF", "rouge1": "ROUGE-1",
                "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
PLOT_FILES = {"loss_plot": "loss.png", "method_stats_plot": "method_stats.png", "base_vs_tuned_plot": "base_vs_tuned.png",
              "confusion_plot": "confusion.png"}
MAX_EXAMPLES = 50  # the caller picks how many to show; this only bounds the page size
BASE_COLOR, TUNED_COLOR = "#9aa5b1", "#2b6cb0"


# --- numbers and formatting --------------------------------------------------------------------


def _num(x) -> float | None:
    """A finite-or-infinite real number from ``x``, or None for missing / non-numeric / NaN values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x):
        return None
    return float(x)


def is_fraction_metric(key: str) -> bool:
    """Metrics on a 0..1 scale, shown as percentages with deltas in points (also names like
    `preference_accuracy`, `recall_at_5` or `teacher_agreement`)."""
    return (key in FRACTION_METRICS or key.startswith(("rouge", "recall_at_"))
            or key.endswith(tuple(f"_{m}" for m in FRACTION_METRICS)))


def lower_is_better(key: str) -> bool:
    return any(w in key for w in LOWER_IS_BETTER) or bool(set(key.split("_")) & set(LOWER_IS_BETTER_WORDS))


def _fmt(x, digits: int = 4) -> str:
    """Plain number: integers with thousands separators, floats to ``digits`` significant figures."""
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}"
    value = _num(x)
    if value is None:
        return "n/a"
    return f"{value:,.1f}" if math.isinf(value) or abs(value) >= 100 else f"{value:.{digits}g}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _points(delta: float) -> str:
    points = round(100 * delta, 1)
    return f"{points + 0.0:+.1f}"  # + 0.0 turns -0.0 into 0.0 so a tie never reads "-0.0"


def _duration(seconds) -> str:
    s = _num(seconds)
    if s is None:
        return "n/a"
    if s < 60:
        return f"{s:.1f}s"
    minutes, secs = divmod(int(round(s)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _clip(text, head: int, tail: int = 0) -> str:
    """Shorten long text for display, keeping the start (and optionally the end) and saying how much went."""
    text = "" if text is None else str(text)
    if len(text) <= head + tail + 20:
        return text
    cut = len(text) - head - tail
    return text[:head] + f" … [{cut:,} characters omitted] … " + (text[-tail:] if tail else "")


# --- metrics.jsonl -----------------------------------------------------------------------------


def read_loss_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "validation": [...]} from metrics.jsonl, in step order.

    Rows without a numeric step and loss are ignored, as are unreadable lines (a run killed mid-write can
    leave a partial last line; the rest of the curve is still worth showing).
    """
    series: dict[str, list[tuple[int, float]]] = {"train": [], "validation": []}
    if not path.is_file():
        return series
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or row.get("split") not in series:
            continue
        step, loss = _num(row.get("step")), _num(row.get("loss"))
        if step is not None and loss is not None and math.isfinite(loss):
            series[row["split"]].append((int(step), loss))
    return {split: sorted(points) for split, points in series.items()}


# --- base vs tuned -----------------------------------------------------------------------------


def _scores(ev: dict, side: str) -> dict[str, float]:
    """Numeric scalar metrics for one side ("base" / "tuned"); dicts, lists and the count n are dropped."""
    raw = ev.get(side) or {}
    return {k: v for k, v in raw.items() if _num(v) is not None and k != "n"}


def primary_metric(ev: dict) -> str | None:
    """The metric the verdict is about: the method's own choice (ev["primary"]), else accuracy for label
    tasks, token F1 otherwise, else any 0..1 metric."""
    tuned = _scores(ev, "tuned")
    if ev.get("primary") in tuned:
        return ev["primary"]
    preferred = "accuracy" if ev.get("task") == "label" else "token_f1"
    if preferred in tuned:
        return preferred
    return next((k for k in tuned if is_fraction_metric(k)), None)


def metric_table(ev: dict) -> list[dict]:
    """Rows {metric, key, base, tuned, delta, tone} for every numeric metric either side reported."""
    base, tuned = _scores(ev, "base"), _scores(ev, "tuned")
    keys = list(dict.fromkeys([*base, *tuned]))
    keys.sort(key=lambda k: (0 if is_fraction_metric(k) else 2 if "seconds" in k else 1))  # stable sort
    rows = []
    for key in keys:
        fraction = is_fraction_metric(key)
        show = _pct if fraction else _fmt
        b, t = base.get(key), tuned.get(key)
        delta, tone = "", ""
        if b is not None and t is not None and math.isfinite(b) and math.isfinite(t):
            diff = t - b
            delta = f"{_points(diff)} pts" if fraction else ("+" if diff > 0 else "") + _fmt(diff)
            better = diff < 0 if lower_is_better(key) else diff > 0
            tone = "" if abs(diff) < 1e-12 else ("good" if better else "bad")
        rows.append({"metric": METRIC_NAMES.get(key, key.replace("_", " ")), "key": key,
                     "base": "n/a" if b is None else show(b), "tuned": "n/a" if t is None else show(t),
                     "delta": delta, "tone": tone})
    return rows


def judge(info: dict) -> tuple[str, str]:
    """(verdict sentence, tone) where tone is "good" (tuned beats base), "bad" (it did not) or "neutral"."""
    ev = info.get("eval")
    if not ev:
        val = _num((info.get("training") or {}).get("final_val_loss"))
        extra = f" (final validation loss {_fmt(val)})" if val is not None else ""
        return ("Held-out evaluation was not run, so this report makes no claim that the tuned model beats "
                f"the base model{extra}.", "neutral")
    key = primary_metric(ev)
    if key is None:
        return "Held-out evaluation reported no comparable score, so the tuned model cannot be compared.", "neutral"
    name = METRIC_NAMES.get(key, key.replace("_", " "))
    n = ev.get("n")
    on = f"on {n:,} held-out example{'' if n == 1 else 's'}" if isinstance(n, int) else "on held-out data"
    tuned, base = _scores(ev, "tuned")[key], _scores(ev, "base").get(key)
    if base is None:
        shown = _pct(tuned) if is_fraction_metric(key) else _fmt(tuned)
        return (f"The tuned model scores {shown} {name} {on}; the base model was not evaluated, "
                "so there is no comparison.", "neutral")
    if is_fraction_metric(key):
        return _judge_fraction(name, on, base, tuned)
    return _judge_value(name, on, base, tuned, lower_is_better(key))


def _judge_fraction(name: str, on: str, base: float, tuned: float) -> tuple[str, str]:
    points = round(100 * (tuned - base), 1)  # judged at the precision shown, so the words match the table
    change = f"({_pct(base)} -> {_pct(tuned)})"
    if points > 0:
        return f"The tuned model beats the base model by {points:+.1f} points of {name} {on} {change}.", "good"
    if points == 0:
        return f"The tuned model did not improve on the base model: {name} stayed at {_pct(base)} {on}.", "bad"
    return (f"The tuned model did not improve on the base model: {name} fell by {-points:.1f} points {on} "
            f"{change}.", "bad")


def _judge_value(name: str, on: str, base: float, tuned: float, lower_better: bool) -> tuple[str, str]:
    """Verdict on an unbounded metric (perplexity, mean reward), compared at the precision shown."""
    b, t = float(_fmt(base).replace(",", "")), float(_fmt(tuned).replace(",", ""))
    change = f"({_fmt(base)} -> {_fmt(tuned)})"
    if b == t:
        return f"The tuned model did not improve on the base model: {name} stayed at {_fmt(base)} {on}.", "bad"
    moved = "fell" if t < b else "rose"
    if (t < b) == lower_better:
        return f"The tuned model beats the base model: {name} {moved} {change} {on}.", "good"
    return f"The tuned model did not improve on the base model: {name} {moved} {change} {on}.", "bad"


def verdict(info: dict) -> str:
    """One sentence saying, from the held-out numbers, whether the tuned model beat the base model."""
    return judge(info)[0]


# --- plots -------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _rolling_mean(values: list[float], window: int) -> np.ndarray:
    """Centred moving average (window shrinks at the ends): a trend line that does not lag the raw curve.
    Computed from a cumulative sum so a 100k-step run costs no more than a short one."""
    v = np.asarray(values, dtype=float)
    total = np.concatenate([[0.0], np.cumsum(v)])
    idx = np.arange(len(v))
    lo, hi = np.maximum(0, idx - window // 2), np.minimum(len(v), idx + window // 2 + 1)
    return (total[hi] - total[lo]) / (hi - lo)


def plot_loss(series: dict[str, list[tuple[int, float]]], path: Path, best_step=None,
              early_stop: dict | None = None) -> Path | None:
    """Training (raw + smoothed when long) and validation loss against step; None when there is no loss.
    With early stopping, the step whose weights were restored and the step it stopped at are marked too."""
    train, val = series.get("train") or [], series.get("validation") or []
    if not train and not val:
        return None
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    if train:
        steps, losses = zip(*train)
        smooth = len(train) > 30  # per-step loss is noisy; a faint raw line plus a trend reads best
        ax.plot(steps, losses, color=TUNED_COLOR, alpha=0.3 if smooth else 1, lw=1, label="train",
                marker="" if smooth else "o", ms=3)
        if smooth:
            ax.plot(steps, _rolling_mean(list(losses), max(5, len(train) // 25)), color=TUNED_COLOR, lw=2,
                    label="train (moving average)")
    if val:
        steps, losses = zip(*val)
        ax.plot(steps, losses, "o-", color="#dd6b20", lw=2, ms=4, label="validation")
    if _num(best_step) is not None:
        ax.axvline(best_step, color="#555", ls=":", lw=1, label=f"best step {best_step}")
    es = early_stop or {}
    if _num(es.get("restored_step")) is not None and es["restored_step"] != best_step:
        ax.axvline(es["restored_step"], color="#276749", ls="--", lw=1,
                   label=f"restored step {es['restored_step']} (the weights in final/)")
    if _num(es.get("stopped_step")) is not None:
        ax.axvline(es["stopped_step"], color="#c53030", ls="--", lw=1, label=f"stopped early at {es['stopped_step']}")
    ax.set(xlabel="step", ylabel="loss (nats / target token)", title="Loss")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, even on a 2-step run
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path)
    return path


def read_stat_series(path: Path, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    """{stat: [(step, value)]} from the training rows of metrics.jsonl, for the method's named stats."""
    series: dict[str, list[tuple[int, float]]] = {n: [] for n in names}
    if not names or not path.is_file():
        return series
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or row.get("split") != "train" or _num(row.get("step")) is None:
            continue
        for n in names:
            value = _num(row.get(n))
            if value is not None and math.isfinite(value):
                series[n].append((int(row["step"]), value))
    return series


def plot_method_stats(series: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """One small panel per statistic a method logs while it trains (rlhf: reward and KL; dpo: reward
    accuracy and margin): what the run did, which its loss alone does not show."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig = _figure(4 * min(3, len(series)), 3.2 * ((len(series) + 2) // 3))
    for i, (name, points) in enumerate(series.items(), 1):
        ax = fig.add_subplot((len(series) + 2) // 3, min(3, len(series)), i)
        steps, values = zip(*points)
        smooth = len(points) > 30
        ax.plot(steps, values, color=TUNED_COLOR, alpha=0.3 if smooth else 1, lw=1, marker="" if smooth else "o",
                ms=3)
        if smooth:
            ax.plot(steps, _rolling_mean(list(values), max(5, len(points) // 25)), color=TUNED_COLOR, lw=2)
        ax.set(xlabel="step", title=name.replace("_", " "))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def plot_base_vs_tuned(ev: dict, path: Path) -> Path | None:
    """Grouped bars of the 0..1 metrics, base beside tuned; None when there are none to draw."""
    sides = [(s, c, _scores(ev, s)) for s, c in (("base", BASE_COLOR), ("tuned", TUNED_COLOR))]
    sides = [(s, c, v) for s, c, v in sides if v]
    keys = [k for k in dict.fromkeys(k for _, _, v in sides for k in v) if is_fraction_metric(k)]
    if not keys:
        return None
    fig = _figure(max(5.0, 1.6 * len(keys) + 2), 4.5)
    ax = fig.add_subplot()
    width = 0.8 / len(sides)
    for i, (side, color, values) in enumerate(sides):
        xs = [j + (i - (len(sides) - 1) / 2) * width for j in range(len(keys))]
        heights = [100 * values.get(k, 0.0) for k in keys]
        bars = ax.bar(xs, heights, width, color=color, label=side)
        ax.bar_label(bars, labels=[f"{h:.1f}" if k in values else "n/a" for h, k in zip(heights, keys)],
                     padding=2, fontsize=9)
    ax.set_xticks(range(len(keys)), [METRIC_NAMES.get(k, k) for k in keys])
    ax.set(ylim=(0, 110), ylabel="%", title=f"Base vs tuned on {ev.get('n', '?')} held-out examples")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")
    fig.savefig(path)
    return path


def confusion_grid(confusion: dict, labels: list | None) -> tuple[list[str], list[str], list[list[int]]]:
    """Dense (rows=gold, columns=predicted [+ "(invalid)"], counts) from the sparse confusion dict."""
    rows = list(dict.fromkeys([*(labels or []), *confusion]))
    seen = [p for row in confusion.values() for p in row]
    cols = list(dict.fromkeys([*rows, *(p for p in seen if p != INVALID)]))
    if INVALID in seen:
        cols.append(INVALID)
    return rows, cols, [[int(confusion.get(r, {}).get(c, 0)) for c in cols] for r in rows]


def plot_confusion(confusion: dict, labels: list | None, path: Path) -> Path | None:
    """Heatmap of the tuned model's confusion matrix, coloured by share of each gold row.

    Sized per label and with small fonts so ~80 labels stay legible; counts are written in the cells only
    when there are few enough labels for them to fit.
    """
    rows, cols, grid = confusion_grid(confusion or {}, labels)
    if not rows:
        return None
    side = min(max(6.0, 0.19 * len(cols) + 3), 24)
    fig = _figure(side + 1.5, min(max(5.0, 0.19 * len(rows) + 3), 24))
    ax = fig.add_subplot()
    shares = [[c / (sum(r) or 1) for c in r] for r in grid]
    # Start the colour scale above white and paint only true zeros white, so a single stray error shows.
    cmap = ListedColormap(colormaps["Blues"](np.linspace(0.18, 1, 256))).with_extremes(under="white")
    im = ax.imshow(shares, cmap=cmap, vmin=1e-9, vmax=1, aspect="auto", interpolation="nearest")
    if cols[-1] == INVALID:
        ax.axvline(len(cols) - 1.5, color="#c53030", lw=0.8, ls="--")
    font = 9 if len(cols) <= 20 else 7 if len(cols) <= 45 else 6
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=font)
    ax.set_yticks(range(len(rows)), rows, fontsize=font)
    ax.set(xlabel="predicted", ylabel="gold", title="Tuned model: confusion matrix (colour = share of gold row)")
    if len(cols) <= 30:
        for i, row in enumerate(grid):
            for j, count in enumerate(row):
                if count:
                    ax.text(j, i, str(count), ha="center", va="center", fontsize=font,
                            color="white" if shares[i][j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, shrink=0.6, label="share of gold row")
    fig.savefig(path)
    return path


# --- sections ----------------------------------------------------------------------------------


def summary_rows(info: dict) -> list[tuple[str, str]]:
    """(label, value) rows describing the training run."""
    t = info.get("training") or {}
    trainable, total = _num(t.get("trainable_params")), _num(t.get("total_params"))
    params = f"{_fmt(t.get('trainable_params'))} of {_fmt(t.get('total_params'))}"
    if trainable is not None and total:
        params += f" ({100 * trainable / total:.2f}%)"
    tps = _num(t.get("tokens_per_second"))
    return [
        ("status", str(info.get("status", "n/a"))), ("method", str(t.get("method", "n/a"))),
        ("training time", _duration(t.get("seconds"))),
        ("tokens / second", "n/a" if tps is None else f"{tps:,.0f}" if tps >= 100 else f"{tps:.1f}"),
        ("steps", _fmt(t.get("steps"))), ("epochs", _fmt(t.get("epochs"), 3)),
        ("trainable / total parameters", params),
        ("device", str(t.get("device", "n/a"))), ("precision", str(t.get("precision", "n/a"))),
        ("final train loss", _fmt(t.get("final_train_loss"))),
        ("final validation loss", _fmt(t.get("final_val_loss"))),
        ("validation perplexity", _fmt(t.get("val_perplexity"))), ("best step", _fmt(t.get("best_step"))),
    ]


def data_rows(info: dict) -> list[tuple[str, str]]:
    """(label, value) rows of data counts; dropped records are always listed, zero or not."""
    d = info.get("data") or {}
    rows = [(k.replace("_", " "), _fmt(d.get(k))) for k in
            ("train_examples", "validation_examples", "train_tokens", "target_tokens")]
    rows += [(f"{k} records", _fmt(d.get(k, 0))) for k in ("truncated", "skipped", "rejected")]
    shapes = d.get("shapes") or {}
    if shapes:
        rows.append(("record shapes", ", ".join(f"{k}: {_fmt(v)}" for k, v in shapes.items())))
    for key, value in (d.get("method_facts") or {}).items():  # what a method wants the reader to know
        rows.append((str(key).replace("_", " "), value if isinstance(value, str) else _fmt(value)))
    labels = d.get("labels") or []
    if labels:
        shown = ", ".join(map(str, labels[:20])) + (f", … and {len(labels) - 20} more" if len(labels) > 20 else "")
        rows.append((f"labels ({len(labels)})", shown))
    return rows


def _mark(output: str, reference: str, labels: list | None) -> tuple[bool, str]:
    """(correct?, short mark) for one model output against the reference."""
    if labels:
        picked = match_label(output, labels)
        ok = picked is not None and label_key(picked) == label_key(reference)
        return ok, "✓ correct" if ok else ("✗ no label" if picked is None else f"✗ read as {picked}")
    if exact_match(output, reference):
        return True, "✓ exact match"
    return False, f"✗ token F1 {token_f1(output, reference):.2f}"


def example_rows(ev: dict, labels: list | None) -> list[dict]:
    """A handful of held-out examples, clipped for display, each output marked correct or not.

    A method that judges its own outputs (rlhf's reward, contrastive's retrieval) gives the mark with the
    example (`<side>_judged`: {"ok", "mark"}); otherwise the output is compared with the reference. Extra
    answers a method shows beside them (distill's teacher) come as `extra`: [{"side", "text"}], unmarked.
    """
    labels = labels if ev.get("task") == "label" else None
    rows = []
    for ex in (ev.get("examples") or [])[:MAX_EXAMPLES]:
        ref = str(ex.get("reference", ""))
        row = {"prompt": _clip(ex.get("prompt"), 600, 300), "reference": _clip(ref, 300), "outputs": []}
        for side in ("base", "tuned"):
            if ex.get(side) is not None:
                judged = ex.get(f"{side}_judged")
                ok, mark = ((bool(judged.get("ok")), str(judged.get("mark", ""))) if isinstance(judged, dict)
                            else _mark(str(ex[side]), ref, labels))
                row["outputs"].append({"side": side, "text": _clip(ex[side], 400), "ok": ok, "mark": mark})
        for extra in ex.get("extra") or []:
            row["outputs"].append({"side": str(extra.get("side", "")), "text": _clip(extra.get("text"), 400),
                                   "ok": None, "mark": ""})
        rows.append(row)
    return rows


def build_context(info: dict, plots: dict[str, Path]) -> dict:
    """Everything both renderers show, as plain strings and lists (renderers only lay it out)."""
    ev = info.get("eval") or None
    labels = (ev or {}).get("labels") or (info.get("data") or {}).get("labels") or None
    evaluation = None
    if ev:
        evaluation = {"task": ev.get("task", "n/a"), "n": ev.get("n", "n/a"), "table": metric_table(ev),
                      "has_base": bool(_scores(ev, "base")), "examples": example_rows(ev, labels)}
    text, tone = judge(info)
    return {
        "name": str(info.get("name", "run")), "status": str(info.get("status", "unknown")),
        "verdict": text, "verdict_tone": tone,
        "summary": summary_rows(info), "data": data_rows(info), "eval": evaluation,
        "plots": {k: f"plots/{p.name}" for k, p in plots.items()},
        "config_yaml": str(info.get("config_yaml") or "").rstrip(),
        "iteration": iteration_context(info),
        "failures": failure_view((ev or {}).get("analysis")),
    }


# --- iteration: overfitting watch, early stopping, forgetting check, evaluation gate --------------


def _interval_mean(train: list[tuple[int, float]], lo: int | None, hi: int) -> float | None:
    """Mean training loss logged in (lo, hi]: the training figure beside a validation point, less noisy
    than the single nearest log line. Falls back to the last value logged at or before hi."""
    inside = [v for s, v in train if (lo is None or s > lo) and s <= hi]
    if inside:
        return sum(inside) / len(inside)
    before = [v for s, v in train if s <= hi]
    return before[-1] if before else None


def overfitting_watch(series: dict[str, list[tuple[int, float]]], threshold: float = 0.10) -> dict | None:
    """Train vs validation loss over steps, the best validation step, and whether the run overfitted:
    flagged when the last validation loss is more than `threshold` (relative) above the best one while
    training loss kept falling over the same steps. None without validation points."""
    train, val = series.get("train") or [], series.get("validation") or []
    if not val:
        return None
    gaps, prev = [], None
    for step, loss in val:
        t = _interval_mean(train, prev, step)
        gaps.append({"step": step, "train": t, "val": loss, "gap": None if t is None else loss - t})
        prev = step
    best = min(range(len(gaps)), key=lambda i: (gaps[i]["val"], i))
    b, f = gaps[best], gaps[-1]
    rise = (f["val"] - b["val"]) / abs(b["val"]) if b["val"] else 0.0
    train_fell = b["train"] is not None and f["train"] is not None and f["train"] < b["train"]
    return {"best_step": b["step"], "best_val_loss": b["val"], "final_step": f["step"], "final_val_loss": f["val"],
            "rise": rise, "train_at_best": b["train"], "train_at_final": f["train"], "train_fell": train_fell,
            "threshold": threshold, "flagged": bool(rise > threshold and train_fell), "gaps": gaps}


def _pick_rows(rows: list, best_step, keep: int = 12) -> list:
    """At most `keep` rows spread evenly, always with the first, the best and the last."""
    if len(rows) <= keep:
        return rows
    idx = {round(i * (len(rows) - 1) / (keep - 2)) for i in range(keep - 1)}
    idx |= {i for i, r in enumerate(rows) if r["step"] == best_step}
    return [rows[i] for i in sorted(idx)]


def overfitting_text(watch: dict) -> tuple[str, str]:
    """(sentence, tone) about the overfitting watch."""
    best = f"step {watch['best_step']} ({_fmt(watch['best_val_loss'])})"
    if watch["flagged"]:
        return (f"Overfitting: validation loss ended {100 * watch['rise']:.1f}% above its best at {best} "
                f"while training loss kept falling ({_fmt(watch['train_at_best'])} -> "
                f"{_fmt(watch['train_at_final'])}).", "bad")
    if watch["final_step"] == watch["best_step"]:
        return f"No sign of overfitting: validation loss was lowest at the last evaluation, {best}.", "good"
    return (f"Validation loss was lowest at {best} and ended {100 * watch['rise']:.1f}% above it (flagged above "
            f"{100 * watch['threshold']:.0f}% while training loss falls).", "neutral")


def early_stop_text(es: dict | None) -> str | None:
    """One sentence on what early stopping did, or None when it was off."""
    if not es:
        return None
    name = es["metric"] + (f" ({es['watched']})" if es.get("watched") not in (None, es["metric"]) else "")
    best = (f"the best {name} was {_fmt(es.get('best'))} at step {es['best_step']}"
            if es.get("best_step") is not None else f"{name} was never measured")
    restored = (f"; final/ holds the weights of step {es['restored_step']}" if es.get("restored_step") is not None
                else "; final/ holds the weights of the last step")
    if es.get("stopped_step") is not None:
        return (f"Stopped early at step {es['stopped_step']} (no improvement for {es.get('bad_evals')} "
                f"evaluations, patience {es.get('patience', 'n/a')}): {best}{restored}.")
    return f"Early stopping was on but did not stop the run: {best}{restored}."


def forgetting_text(fg: dict | None) -> tuple[str, str] | None:
    """(sentence, tone) on general-text perplexity base vs tuned, or None when not measured."""
    if not fg or _num(fg.get("base_perplexity")) is None or _num(fg.get("tuned_perplexity")) is None:
        return None
    change = f"{_fmt(fg['base_perplexity'])} -> {_fmt(fg['tuned_perplexity'])}, {100 * fg['change']:+.1f}%"
    if fg.get("flagged"):
        return (f"Forgetting: general-text perplexity rose beyond the {100 * fg['threshold']:.0f}% threshold "
                f"({change}).", "bad")
    return f"No forgetting flagged: general-text perplexity {change} (threshold {100 * fg['threshold']:.0f}%).", "good"


def iteration_context(info: dict) -> dict:
    """The gate, early stopping, overfitting and forgetting sections, as plain strings and rows."""
    t = info.get("training") or {}
    watch = t.get("overfitting")
    gate = info.get("gate")
    ctx = {"gate": None, "early_stop": early_stop_text(t.get("early_stopping")), "overfitting": None,
           "forgetting": None}
    if gate:
        ctx["gate"] = {"passed": bool(gate.get("passed")), "error": gate.get("error"),
                       "checks": [(c["target"], "n/a" if c.get("value") is None else _fmt(c["value"]),
                                   "passed" if c.get("passed") else "MISSED") for c in gate.get("checks") or []]}
    if watch:
        text, tone = overfitting_text(watch)
        rows = [(str(g["step"]), _fmt(g["train"]), _fmt(g["val"]), "n/a" if g["gap"] is None else f"{g['gap']:+.4f}")
                for g in _pick_rows(watch["gaps"], watch["best_step"])]
        ctx["overfitting"] = {"text": text, "tone": tone, "rows": rows}
    fg = forgetting_text(info.get("forgetting"))
    if fg:
        f = info["forgetting"]
        ctx["forgetting"] = {"text": fg[0], "tone": fg[1], "file": str(f.get("file", "")),
                             "tokens": _fmt(f.get("tokens"))}
    return ctx


def iteration_markdown(it: dict) -> list[str]:
    """report.md lines for the overfitting watch, early stopping and the forgetting check."""
    out = []
    if it["overfitting"] or it["early_stop"]:
        out += ["## Overfitting watch", ""]
        if it["early_stop"]:
            out += [f"**Early stopping.** {_md_cell(it['early_stop'])}", ""]
        if it["overfitting"]:
            out += [_md_cell(it["overfitting"]["text"]), ""]
            out += [*_md_table(("step", "train loss", "validation loss", "gap (val − train)"),
                               it["overfitting"]["rows"]), ""]
    if it["forgetting"]:
        fg = it["forgetting"]
        out += ["## Forgetting check", "", _md_cell(fg["text"]), "",
                f"General text: {_md_cell(fg['file'])} ({fg['tokens']} tokens).", ""]
    return out


def gate_markdown(it: dict) -> list[str]:
    """report.md lines for the evaluation gate (shown under the verdict)."""
    gate = it["gate"]
    if not gate:
        return []
    head = "**Gate: passed.**" if gate["passed"] else "**Gate: FAILED.**"
    out = [head + (f" {_md_cell(gate['error'])}" if gate["error"] else ""), ""]
    if gate["checks"]:
        out += [*_md_table(("target", "value", "result"), gate["checks"]), ""]
    return out


# --- rendering ---------------------------------------------------------------------------------


def _md_cell(text) -> str:
    """Text safe for a markdown table cell. "<" is escaped because markdown viewers render raw HTML;
    ">" and "&" are left alone so the file still reads cleanly as plain text."""
    return str(text).replace("<", "&lt;").replace("|", "\\|").replace("\n", " ⏎ ")


def _md_fence(text: str, lang: str = "") -> str:
    """Fenced code block whose fence is longer than any backtick run inside, so the text cannot end it."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text}\n{fence}"


def _md_table(header: tuple, rows: list) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def render_markdown(ctx: dict) -> str:
    """report.md: the same sections as the HTML, with plots linked from plots/."""
    out = [f"# hone report: {_md_cell(ctx['name'])}", "", f"**{_md_cell(ctx['verdict'])}**", ""]
    out += gate_markdown(ctx["iteration"])
    out += ["## Training", "", *_md_table(("item", "value"), ctx["summary"]), ""]
    out += ["## Data", "", *_md_table(("item", "value"), ctx["data"]), ""]
    if "loss_plot" in ctx["plots"]:
        out += ["## Loss curves", "", f"![loss curves]({ctx['plots']['loss_plot']})", ""]
    out += iteration_markdown(ctx["iteration"])
    if "method_stats_plot" in ctx["plots"]:
        out += ["## Method statistics", "", f"![method statistics]({ctx['plots']['method_stats_plot']})", ""]
    ev = ctx["eval"]
    if ev:
        out += [f"## Base vs tuned ({_md_cell(ev['n'])} held-out examples, {_md_cell(ev['task'])} task)", ""]
        rows = [(r["metric"], r["base"], r["tuned"], r["delta"]) for r in ev["table"]]
        out += [*_md_table(("metric", "base", "tuned", "tuned − base"), rows), ""]
        if "base_vs_tuned_plot" in ctx["plots"]:
            out += [f"![base vs tuned]({ctx['plots']['base_vs_tuned_plot']})", ""]
        if "confusion_plot" in ctx["plots"]:
            out += ["## Confusion matrix (tuned)", "", f"![confusion matrix]({ctx['plots']['confusion_plot']})", ""]
        out += failures_markdown(ctx["failures"])
        if ev["examples"]:
            out += ["## Examples", ""]
        for i, ex in enumerate(ev["examples"], 1):
            out += [f"### Example {i}", "", _md_fence(ex["prompt"], "text"), ""]
            rows = [("reference", ex["reference"], "")] + [(o["side"], o["text"], o["mark"]) for o in ex["outputs"]]
            out += [*_md_table(("", "answer", "mark"), rows), ""]
    if ctx["config_yaml"]:
        out += ["## Config", "", _md_fence(ctx["config_yaml"], "yaml"), ""]
    return "\n".join(out)


def failures_markdown(f: dict | None) -> list[str]:
    """The "Where it fails" section: hardest labels, score by input length, worst examples."""
    if not f:
        return []
    out = ["## Where it fails (tuned)", ""]
    if f["by_label"]:
        out += [f"Hardest labels ({len(f['by_label'])} of {f['labels_total']}, lowest F1 first):", ""]
        out += [*_md_table(("label", "support", "precision", "recall", "F1", "most often answered instead"),
                           [tuple(r.values()) for r in f["by_label"]]), ""]
    if f["by_length"]:
        out += ["By input length (tokens of the user's message):", ""]
        out += [*_md_table(("slice", "tokens", "examples", f["score_name"]),
                           [tuple(r.values()) for r in f["by_length"]]), ""]
    if f["worst"]:
        out += [f"Worst examples ({f['worst_order']}):", ""]
        out += [*_md_table(("input", "expected", "got", "mark"), [tuple(r.values()) for r in f["worst"]]), ""]
    return out


def _with_saved_analysis(info: dict, run_dir: Path) -> dict:
    """info with the tuned model's error analysis from eval_tuned.json when the caller did not pass it."""
    ev = info.get("eval")
    saved = run_dir / "eval_tuned.json"
    if not ev or ev.get("analysis") is not None or not saved.is_file():
        return info
    try:
        analysis = json.loads(saved.read_text(encoding="utf-8")).get("analysis")
    except (OSError, ValueError, AttributeError):
        return info  # a report never fails over an unreadable extra
    return {**info, "eval": {**ev, "analysis": analysis}}


def render_html(ctx: dict, plot_paths: dict[str, Path]) -> str:
    """report.html from the packaged jinja2 template, autoescaped, plots inlined as base64 PNG."""
    source = resources.files("hone.eval").joinpath("templates", "report.html.j2").read_text(encoding="utf-8")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True)
    images = {k: base64.b64encode(p.read_bytes()).decode("ascii") for k, p in plot_paths.items()}
    return env.from_string(source).render(**ctx, images=images)


def write_report(run_dir: Path, info: dict) -> dict[str, Path]:
    """Write report.md, report.html and plots/*.png into ``run_dir``; return {kind: path} for each file.

    ``info`` is the dict the training loop assembles: name, status, config_yaml, data{...},
    training{...}, eval (None when disabled, else task, n, base/tuned metric dicts, confusions, labels,
    examples). Loss curves come from ``run_dir/metrics.jsonl``. Keys of the result: "md", "html", and
    "loss_plot" / "base_vs_tuned_plot" / "confusion_plot" for the plots that had data to draw.
    """
    run_dir = Path(run_dir)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES.values():  # a plot from an earlier report must not outlive its data
        (plot_dir / name).unlink(missing_ok=True)
    ev = info.get("eval") or {}
    best = (info.get("training") or {}).get("best_step")
    labels = ev.get("labels") or (info.get("data") or {}).get("labels")
    made = {
        "loss_plot": plot_loss(read_loss_series(run_dir / "metrics.jsonl"), plot_dir / PLOT_FILES["loss_plot"], best,
                               (info.get("training") or {}).get("early_stopping")),
        "method_stats_plot": plot_method_stats(
            read_stat_series(run_dir / "metrics.jsonl", list((info.get("training") or {}).get("plot_stats") or [])),
            plot_dir / PLOT_FILES["method_stats_plot"]),
        "base_vs_tuned_plot": plot_base_vs_tuned(ev, plot_dir / PLOT_FILES["base_vs_tuned_plot"]) if ev else None,
        "confusion_plot": plot_confusion(ev.get("tuned_confusion"), labels, plot_dir / PLOT_FILES["confusion_plot"])
        if ev.get("task") == "label" and ev.get("tuned_confusion") else None,
    }
    plots = {k: p for k, p in made.items() if p is not None}
    ctx = build_context(_with_saved_analysis(info, run_dir), plots)
    paths = {"md": run_dir / "report.md", "html": run_dir / "report.html"}
    paths["md"].write_text(render_markdown(ctx), encoding="utf-8")
    paths["html"].write_text(render_html(ctx, plots), encoding="utf-8")
    return {**paths, **plots}
