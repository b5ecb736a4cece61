"""Data pipeline speed and memory: hone's clean -> dedup -> redact on 100k tickets, beside the plain library
loops a user would otherwise write (ftfy + BeautifulSoup; textbook datasketch MinHashLSH; stock Presidio).

Each stage and each peer runs in its own subprocess, so its peak RSS (ru_maxrss) is its own. Records/s is
records in / wall seconds of the stage (reading, writing, report and lineage included for hone; the peers
only read and transform in memory, which flatters them). Peers run on the first `--peer-records` records
(Presidio is slow) and their rate is per record, so the ratio is fair.

    python bench/synthetic_tickets.py --records 100000 --out /tmp/tickets100k.jsonl
    python bench/data_pipeline.py /tmp/tickets100k.jsonl                  # all stages + peers
    python bench/data_pipeline.py /tmp/tickets1g.jsonl --stages clean --no-peers   # memory on ~1 GB

Prints a table and writes --json if given.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("clean", "dedup", "redact")


def run_stage(stage: str, source: Path, out: Path) -> dict:
    """Run one hone stage in this process (called in a subprocess)."""
    from hone.data.recipe import stage_parts

    options_class, run = stage_parts(stage)
    options = options_class(**({"mode": "mask"} if stage == "redact" else {}))
    started = time.perf_counter()
    report = run([source], out, options)
    return {"records": report.records_in, "seconds": time.perf_counter() - started,
            "arithmetic": report.arithmetic()}


def peer_clean(rows: list[dict]) -> None:
    import ftfy
    from bs4 import BeautifulSoup

    for r in rows:
        text = ftfy.fix_text(r["text"])
        if "<" in text and ">" in text:
            text = BeautifulSoup(text, "html.parser").get_text("\n")
        r["text"] = " ".join(text.split())


def peer_dedup(rows: list[dict]) -> None:
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    for i, r in enumerate(rows):
        words = r["text"].lower().split()
        m = MinHash(num_perm=128)
        for j in range(max(1, len(words) - 2)):
            m.update(" ".join(words[j:j + 3]).encode())
        if not lsh.query(m):
            lsh.insert(str(i), m)


def peer_redact(rows: list[dict]) -> None:
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_anonymizer import AnonymizerEngine

    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    engine.nlp = {"en": spacy.blank("en")}
    analyzer, anonymizer = AnalyzerEngine(nlp_engine=engine), AnonymizerEngine()
    for r in rows:
        found = analyzer.analyze(r["text"], language="en")
        r["text"] = anonymizer.anonymize(r["text"], found).text


PEERS = {"clean": ("ftfy + BeautifulSoup loop", peer_clean), "dedup": ("datasketch MinHashLSH loop", peer_dedup),
         "redact": ("Presidio Analyzer + Anonymizer", peer_redact)}


def run_peer(stage: str, source: Path, limit: int) -> dict:
    rows = []
    with source.open(encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if len(rows) >= limit:
                break
    started = time.perf_counter()
    PEERS[stage][1](rows)
    return {"records": len(rows), "seconds": time.perf_counter() - started}


def in_subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--peer-records", type=int, default=5000)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", nargs=3, metavar=("KIND", "STAGE", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, stage, out = args.child
        result = run_stage(stage, args.source, Path(out)) if kind == "hone" else \
            run_peer(stage, args.source, args.peer_records)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    results, source = [], args.source
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages.split(","):
            out = Path(tmp) / f"{stage}.jsonl"
            ours = in_subprocess([str(source), "--child", "hone", stage, str(out)])
            row = {"stage": stage, "hone": ours}
            if not args.no_peers:
                row["peer"] = {"name": PEERS[stage][0],
                               **in_subprocess([str(source), "--child", "peer", stage, "-",
                                                "--peer-records", str(args.peer_records)])}
            results.append(row)
            print(_line(row), flush=True)
            source = out  # the next stage reads this one's output, as in a recipe
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def _line(row: dict) -> str:
    h = row["hone"]
    rate = h["records"] / h["seconds"]
    text = (f"{row['stage']:7s} hone {h['records']:>8,} records {h['seconds']:7.1f}s {rate:9,.0f}/s "
            f"peak {h['peak_rss_mb']:6.0f} MB  [{h['arithmetic']}]")
    if "peer" in row:
        q = row["peer"]
        peer_rate = q["records"] / q["seconds"]
        text += (f"\n{'':7s} peer {q['name']}: {q['records']:,} records {q['seconds']:.1f}s {peer_rate:,.0f}/s "
                 f"peak {q['peak_rss_mb']:.0f} MB  -> hone/peer speed {rate / peer_rate:.2f}x")
    return text


if __name__ == "__main__":
    main()
