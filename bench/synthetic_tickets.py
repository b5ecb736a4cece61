"""Write a large, messy support-ticket file for the data-pipeline benchmarks, from real customer queries.

The ticket bodies are real Banking77 customer messages (../shared/datasets/banking77/train.csv), wrapped the
way exports arrive: a greeting with a name, one to three queries (about 60 words), sometimes contact details
and card numbers (PII), a sign-off and signature, and a quoted earlier reply. A share of records is made
messy on purpose: exact duplicates, near duplicates (one word changed), HTML bodies, mojibake (UTF-8 read as
cp1252) and control characters, so each stage has real work to do.

    python bench/synthetic_tickets.py --records 100000 --out /tmp/tickets100k.jsonl
    python bench/synthetic_tickets.py --megabytes 1024 --out /tmp/tickets1g.jsonl     # ~1 GB
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

BANKING77 = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "banking77" / "train.csv"
NAMES = ["Maria Garcia", "John Smith", "Aisha Khan", "Li Wei", "Olga Petrova", "Tom Becker", "Sofia Rossi",
         "Kwame Mensah", "Emma Dubois", "Raj Patel", "Hannah Novak", "Diego Alvarez"]
GREETINGS = ["Hi", "Hello", "Dear support", "Good morning", "Hey team"]
SIGNOFFS = ["Best regards,", "Thanks,", "Kind regards,", "Cheers,"]
CARDS = ["4111 1111 1111 1111", "5500 0000 0000 0004", "4012888888881881", "3782 822463 10005"]


def load_queries() -> list[tuple[str, str]]:
    if not BANKING77.is_file():
        raise SystemExit(f"{BANKING77} not found: this benchmark needs ../shared/datasets/banking77")
    with BANKING77.open(encoding="utf-8") as f:
        return [(row["text"], row["category"]) for row in csv.DictReader(f)]


def make_ticket(rng: random.Random, queries: list[tuple[str, str]], i: int) -> dict:
    name = rng.choice(NAMES)
    first = name.split()[0]
    picked = [rng.choice(queries) for _ in range(rng.choice((1, 2, 3)))]
    body = " ".join(q for q, _ in picked)
    parts = [f"{rng.choice(GREETINGS)},", "", body]
    if rng.random() < 0.3:
        user = name.lower().replace(" ", ".")
        parts.append(f"You can reach me at {user}{i % 97}@example.com or +44 20 7946 {i % 10000:04d}.")
    if rng.random() < 0.1:
        parts.append(f"My card is {rng.choice(CARDS)} if you need it.")
    parts += ["", rng.choice(SIGNOFFS), name]
    if rng.random() < 0.3:
        parts += ["", "On Mon, 3 Mar 2025 at 10:12, Support <support@bank.example> wrote:",
                  "> Thanks for contacting us. Could you tell us more?", "> Support team"]
    text = "\n".join(parts)
    roll = rng.random()
    if roll < 0.03:
        text = "<html><body><p>" + text.replace("\n\n", "</p><p>").replace("\n", "<br>") + "</p></body></html>"
    elif roll < 0.05:
        text = text.encode("utf-8").decode("cp1252", errors="replace").replace("\n", "\u00a0\n", 1) + " Ã©"
    elif roll < 0.06:
        text = text.replace(" ", "  \x07 ", 2)
    return {"text": text, "label": picked[0][1], "meta": {"ticket": f"T{i:07d}", "customer": first}}


def near_copy(rng: random.Random, record: dict) -> dict:
    words = record["text"].split(" ")
    j = rng.randrange(len(words))
    words[j] = words[j] + "s"
    return {**record, "text": " ".join(words)}


def generate(out: Path, records: int | None, megabytes: float | None, seed: int = 0) -> int:
    rng = random.Random(seed)
    queries = load_queries()
    limit = int(megabytes * 1e6) if megabytes else None
    written, size, recent = 0, 0, []
    with out.open("w", encoding="utf-8") as f:
        while (records is None or written < records) and (limit is None or size < limit):
            roll = rng.random()
            if recent and roll < 0.05:
                record = rng.choice(recent)                 # exact duplicate
            elif recent and roll < 0.10:
                record = near_copy(rng, rng.choice(recent))  # near duplicate
            else:
                record = make_ticket(rng, queries, written)
            recent = (recent + [record])[-500:]
            line = json.dumps(record, ensure_ascii=False) + "\n"
            f.write(line)
            size += len(line.encode("utf-8"))
            written += 1
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--records", type=int)
    p.add_argument("--megabytes", type=float)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.records and not args.megabytes:
        p.error("give --records or --megabytes")
    n = generate(args.out, args.records, args.megabytes, args.seed)
    print(f"wrote {n} records, {args.out.stat().st_size / 1e6:.1f} MB -> {args.out}")


if __name__ == "__main__":
    main()
