"""Precision and recall of `hone data redact` per PII type on a labelled set, and its speed on a big file.

The labelled set (tests/fixtures/data/pii/labelled.jsonl, hand-written support-ticket and e-mail text) has
one JSON object a line: {"text": ..., "spans": [{"start", "end", "type"}]}, offsets in characters, with hard
negatives (order numbers, non-Luhn 16-digit numbers, version strings, plain URLs, dates, prices, hashes).

**Matching rule (overlap).** A gold span is *found* when a predicted span of the same type shares at least
one character with it (recall = found / gold). A predicted span is *correct* when it shares at least one
character with a gold span of the same type (precision = correct / predicted). Two stricter columns keep
the overlap rule honest: `masked` is the share of gold characters covered by some predicted span of any type
(what a reader of the redacted text would no longer see), `exact` the share of gold spans predicted with
exactly the same offsets and type.

    python bench/redact_quality.py                         # default engine (Presidio if it starts)
    python bench/redact_quality.py --engine regex          # hone's patterns only
    python bench/redact_quality.py --ner-model en_core_web_sm   # + a spaCy NER model for PERSON
    python bench/redact_quality.py --speed /tmp/tickets100k.jsonl --limit 20000   # records/s
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABELLED = ROOT / "tests" / "fixtures" / "data" / "pii" / "labelled.jsonl"
sys.path.insert(0, str(ROOT / "src"))

from hone.data.pii_patterns import PII_TYPES
from hone.data.redact import Detector, RedactOptions, RedactState, redact_record


def load_labelled(path: Path = LABELLED) -> list[dict]:
    """The labelled rows, each checked: offsets inside the text, known types, no overlapping gold spans."""
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        last_end = -1
        for s in sorted(row["spans"], key=lambda s: s["start"]):
            if not (0 <= s["start"] < s["end"] <= len(row["text"])) or s["type"] not in PII_TYPES:
                raise ValueError(f"{path}:{n}: bad span {s}")
            if s["start"] < last_end:
                raise ValueError(f"{path}:{n}: overlapping spans at {s['start']}")
            last_end = s["end"]
        rows.append(row)
    return rows


def _overlaps(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def evaluate(rows: list[dict], detector: Detector) -> dict[str, dict]:
    """Per type: gold, predicted, found (recall numerator), correct (precision numerator), masked chars."""
    stats = {t: Counter() for t in PII_TYPES}
    for row in rows:
        gold = row["spans"]
        pred = [{"start": f.start, "end": f.end, "type": f.type} for f in detector.find(row["text"])]
        for g in gold:
            s = stats[g["type"]]
            s["gold"] += 1
            s["found"] += any(p["type"] == g["type"] and _overlaps(p, g) for p in pred)
            s["exact"] += g in pred
            s["gold_chars"] += g["end"] - g["start"]
            s["masked_chars"] += sum(max(0, min(g["end"], p["end"]) - max(g["start"], p["start"])) for p in pred)
        for p in pred:
            s = stats[p["type"]]
            s["predicted"] += 1
            s["correct"] += any(g["type"] == p["type"] and _overlaps(p, g) for g in gold)
    return {t: _rates(s) for t, s in stats.items() if s["gold"] or s["predicted"]}


def _rates(s: Counter) -> dict:
    return {"gold": s["gold"], "predicted": s["predicted"],
            "recall": s["found"] / s["gold"] if s["gold"] else None,
            "precision": s["correct"] / s["predicted"] if s["predicted"] else None,
            "masked": s["masked_chars"] / s["gold_chars"] if s["gold_chars"] else None,
            "exact": s["exact"] / s["gold"] if s["gold"] else None}


def format_table(result: dict[str, dict]) -> str:
    def pct(x):
        return "  -  " if x is None else f"{x:5.3f}"

    lines = [f"{'type':<15} {'gold':>5} {'pred':>5} {'recall':>7} {'prec.':>7} {'masked':>7} {'exact':>7}"]
    for t, r in result.items():
        lines.append(f"{t:<15} {r['gold']:>5} {r['predicted']:>5} {pct(r['recall']):>7} {pct(r['precision']):>7}"
                     f" {pct(r['masked']):>7} {pct(r['exact']):>7}")
    return "\n".join(lines)


def measure_speed(path: Path, options: RedactOptions, limit: int | None) -> dict:
    """Records/s of redact_record over the first `limit` records of a JSONL file (engine start excluded)."""
    started = time.perf_counter()
    state = RedactState(Detector(options), options)
    startup = time.perf_counter() - started
    n, chars = 0, 0
    t0 = time.perf_counter()
    with path.open(encoding="utf-8") as f:
        for line in f:
            if limit is not None and n >= limit:
                break
            record = json.loads(line)
            chars += sum(len(v) for v in record.values() if isinstance(v, str))
            redact_record(record, state)
            n += 1
    seconds = time.perf_counter() - t0
    return {"engine": state.detector.engine, "records": n, "seconds": round(seconds, 2),
            "records_per_s": round(n / seconds, 1), "startup_s": round(startup, 2),
            "mean_chars": round(chars / max(n, 1)), "spans": sum(state.spans.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labelled", type=Path, default=LABELLED)
    ap.add_argument("--engine", default="auto", choices=["auto", "presidio", "regex"])
    ap.add_argument("--ner-model", default=None)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--speed", type=Path, help="also measure records/s on this JSONL file")
    ap.add_argument("--limit", type=int, default=None, help="records of --speed file to use")
    args = ap.parse_args()
    options = RedactOptions(engine=args.engine, ner_model=args.ner_model, threshold=args.threshold)
    if args.speed:
        print(json.dumps(measure_speed(args.speed, options, args.limit)))
        return
    detector = Detector(options)
    rows = load_labelled(args.labelled)
    result = evaluate(rows, detector)
    print(f"engine: {detector.engine}; {len(rows)} texts, {sum(r['gold'] for r in result.values())} gold spans; "
          f"overlap match (see docstring)")
    print(format_table(result))


if __name__ == "__main__":
    main()
