"""`hone data dedup`: drop exact and near duplicates, and records that leak an evaluation set.

A record is compared as a whole: its text fields (stage.record_texts: prompt and completion, every
message's content, ...) are normalised (casefold, punctuation to spaces, whitespace collapsed) and joined
with a field separator. The label is NOT part of the key: the same text with two labels is a contradiction
the model cannot learn from, so the second one is dropped as `conflicting_label` (the first is kept, and the
cluster in the report says so). Three checks, in this order, each streaming (query, then insert: what
is remembered grows with the records kept, never with the input):

1. contamination (`eval_files`): a record whose text equals, or nearly equals, a record of an evaluation
   file is dropped as `contaminated` (message names the eval file:line), or only flagged in the report
   with `keep_contaminated` (use that to check a train/eval pair without changing anything).
2. exact: the same normalised text as a kept record -> `duplicate` (or `conflicting_label`).
3. near: MinHash (datasketch, `num_perm` permutations) of word 3-gram shingles, or character 5-grams
   when a record has fewer than `short_words` words, queried in an LSH band index (MinHashLSH's bands and
   rows, see minhash_index.py); candidates are confirmed by their estimated Jaccard similarity >=
   threshold -> `near_duplicate`.

What is kept per kept record (file:line, label, hashes, signature) lives in a store (`index`): compact RAM
structures (`memory`, about 1.2 KB a kept record), or an SQLite file in a temporary directory next to the
output, removed at the end (`disk`: RAM stays flat whatever the input size). `auto` picks disk when the
inputs total more than AUTO_DISK_BYTES.

The first record of each cluster is kept, so the output keeps the input's order and first occurrences.
The report lists up to `max_report_clusters` clusters (kept file:line, the dropped ones with their
similarity) and the total.

    hone data dedup clean.jsonl --out dedup.jsonl --threshold 0.8 --eval test.jsonl
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hone.data.minhash_index import DiskStore, MemoryStore, band_hashes, lsh_params, open_store
from hone.data.readers import DataError
from hone.data.stage import Reject, StageReport, read_records, record_texts, run_stage, where
from hone.records import Problem

_NOT_WORD = re.compile(r"[^\w\s]+|_+")
_FIELD_SEP = "\x1f"  # a token no normalised text contains: shingles do not bridge two fields silently
_MAX_DROPPED_LISTED = 20  # per cluster in the report; the cluster still counts them all
# `index: auto` goes to disk above this input size: ~600k ticket-like records, whose memory index would
# take ~0.7 GB of RAM (measured ~1.2 KB a kept record); below it the memory index is ~1.5x faster and
# small. (Compressed parquet holds more records per byte: choose `disk` explicitly for big parquet.)
AUTO_DISK_BYTES = 200 * 1024 * 1024


class DedupOptions(BaseModel):
    """Options of `hone data dedup` (the `dedup:` section of a `hone data prepare` recipe)."""

    model_config = ConfigDict(extra="forbid")

    exact: bool = Field(True, description="Drop records whose normalised text equals a kept record's.")
    near: bool = Field(True, description="Drop near duplicates found by MinHash LSH.")
    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Estimated Jaccard similarity of shingle "
                             "sets at or above which two records are near duplicates.")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations: more is more accurate "
                          "and slower.")
    shingle_words: int = Field(3, ge=1, le=10, description="Words per shingle (word n-grams).")
    short_words: int = Field(8, ge=0, description="Records with fewer words than this are shingled into "
                             "character 5-grams instead (word 3-grams of a short text are too few).")
    eval_files: list[Path] = Field(default_factory=list, description="Evaluation files: input records "
                                   "matching one of their records (exact or near) are contaminated.")
    keep_contaminated: bool = Field(False, description="Only flag contaminated records in the report "
                                    "instead of dropping them.")
    max_report_clusters: int = Field(200, ge=0, description="Clusters listed in the report (all counted).")
    seed: int = Field(1, description="Seed of the MinHash permutations.")
    index: Literal["auto", "memory", "disk"] = Field(
        "auto", description="Where kept records' hashes and signatures live: 'memory' (fastest, ~1.2 KB of "
        "RAM per kept record), 'disk' (an SQLite file in a temporary directory next to the output, removed at "
        "the end; RAM stays flat whatever the input size), or 'auto' (disk when the inputs total more than "
        "200 MB, else memory). The results are the same.")


# --- the pure pieces -------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Casefolded, punctuation and symbols turned to spaces, whitespace collapsed and stripped."""
    return " ".join(_NOT_WORD.sub(" ", text.casefold()).split())


def record_key_text(record: dict) -> str:
    """The normalised text a record is compared by; raw text when normalising leaves nothing (emoji)."""
    texts = record_texts(record)
    norm = [normalise(t) for t in texts]
    if not any(norm):
        norm = [" ".join(t.split()) for t in texts]
    return f" {_FIELD_SEP} ".join(norm)


def exact_key(key_text: str) -> bytes:
    return hashlib.blake2b(key_text.encode("utf-8"), digest_size=16).digest()


def shingles(key_text: str, words: int = 3, short_words: int = 8, chars: int = 5) -> set[bytes]:
    """Word n-gram shingles of a normalised text; character n-grams when it has < short_words words."""
    tokens = key_text.split()
    if len(tokens) < short_words or len(tokens) < words:
        if len(key_text) <= chars:
            return {key_text.encode("utf-8")} if key_text else set()
        return {key_text[i:i + chars].encode("utf-8") for i in range(len(key_text) - chars + 1)}
    return {" ".join(tokens[i:i + words]).encode("utf-8") for i in range(len(tokens) - words + 1)}


def jaccard_estimate(a: np.ndarray, b: np.ndarray) -> float:
    """Share of equal MinHash values: an unbiased estimate of the Jaccard similarity of the two sets."""
    return float(np.count_nonzero(a == b)) / len(a)


class MinHashIndex:
    """MinHash signatures of records, and the kept ones' LSH bands in a store, to find near duplicates."""

    def __init__(self, threshold: float, num_perm: int, seed: int, store: MemoryStore | DiskStore):
        from datasketch import MinHash

        self.threshold = threshold
        self.store = store
        # crc32 is C-fast and stable across processes; datasketch's affine32 scheme pre-mixes each input
        # hash with the MurmurHash3 finaliser, so its linearity does not bias the estimate. One MinHash
        # is reused (cleared per record): making a MinHash per record costs more than hashing it.
        self._m = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)
        # Bands and rows weighted against false negatives (datasketch's default 0.5/0.5 finds only ~40%
        # of pairs at the threshold): every candidate is confirmed by its estimated Jaccard, so a false
        # candidate costs one comparison, while a missed one is a duplicate left in the data.
        self.bands, self.rows = lsh_params(threshold, num_perm)

    def minhash(self, items: set[bytes]) -> Sketch:
        """The MinHash signature of `items` (uint32: datasketch's values are below 2**32) and its bands."""
        self._m.clear()
        self._m.update_batch(items)
        signature = self._m.hashvalues.astype(np.uint32)
        return Sketch(signature, band_hashes(signature, self.bands, self.rows))

    def best_match(self, sketch: Sketch) -> tuple[int, float] | None:
        """(key, estimated Jaccard) of the most similar indexed set at or above threshold; lowest key on ties."""
        best: tuple[int, float] | None = None
        for key in self.store.candidates(sketch.bands):
            sim = jaccard_estimate(sketch.signature, self.store.signature(key))
            if sim >= self.threshold and (best is None or sim > best[1] or (sim == best[1] and key < best[0])):
                best = (key, sim)
        return best

    def add(self, key: int, sketch: Sketch) -> None:
        """Index `sketch` under kept record `key`."""
        self.store.put_signature(key, sketch.signature, sketch.bands)


class Sketch(NamedTuple):
    """A record's MinHash signature and its LSH band hashes (computed once, used to query and to add)."""

    signature: np.ndarray
    bands: list[int]


# --- the stage -------------------------------------------------------------------------------------------

class Deduplicator:
    """Streaming state of one dedup run: `check(record)` returns None (keep) or a Reject.

    `backend` is 'memory' or 'disk' (see minhash_index.py; a disk store's files go under `directory`).
    Use it as a context manager, or call `close()`: that removes a disk store's temporary files.
    """

    def __init__(self, options: DedupOptions, eval_index: EvalIndex | None = None, backend: str = "memory",
                 directory: Path | None = None):
        self.o = options
        self.eval = eval_index
        self.store = open_store(backend, options.num_perm, directory)
        try:
            self.index = (MinHashIndex(options.threshold, options.num_perm, options.seed, self.store)
                          if options.near else None)
        except BaseException:
            self.store.close()
            raise
        self.clusters = _Clusters(options.max_report_clusters, self.store.first_drop)
        self.counts = {"duplicate": 0, "conflicting_label": 0, "near_duplicate": 0, "contaminated": 0,
                       "near_duplicate_label_differs": 0}

    def check(self, record: dict) -> Reject | None:
        text = record_key_text(record)
        key = exact_key(text)
        items = shingles(text, self.o.shingle_words, self.o.short_words)
        minhash = self.index.minhash(items) if self.index is not None and items else None
        if self.eval is not None:
            hit = self.eval.match(key, minhash)
            if hit is not None:
                self.counts["contaminated"] += 1
                self.eval.record_hit(record, hit, dropped=not self.o.keep_contaminated)
                if not self.o.keep_contaminated:
                    eval_where, sim = hit
                    return Reject("contaminated", f"{where(record)} matches evaluation record {eval_where} "
                                                  f"(similarity {sim:.2f})")
        kept = self.store.exact_get(key) if self.o.exact else None
        if kept is not None:
            return self._drop(record, kept, 1.0, None)
        if minhash is not None:
            match = self.index.best_match(minhash)
            if match is not None:
                return self._drop(record, match[0], match[1], "near_duplicate")
        kept = self.store.add(where(record), record.get("label"))
        if self.o.exact:
            self.store.exact_put(key, kept)
        if minhash is not None:
            self.index.add(kept, minhash)
        return None

    def _drop(self, record: dict, kept: int, sim: float, code: str | None) -> Reject:
        """Reject `record` as a duplicate of kept record `kept`; code None: exact (label decides which)."""
        kept_at, kept_label = self.store.kept(kept)
        label = record.get("label")
        differs = kept_label != label
        if code is None:
            code = "conflicting_label" if differs else "duplicate"
        self.counts[code] += 1
        if code == "near_duplicate" and differs:
            self.counts["near_duplicate_label_differs"] += 1
        self.clusters.add(kept, kept_at, kept_label, {"where": where(record), "similarity": round(sim, 3),
                                                      "code": code, **({"label": label} if differs else {})})
        if code == "duplicate":
            why = f"exact duplicate (ignoring case, punctuation and spacing) of {kept_at}"
        elif code == "conflicting_label":
            why = f"same text as {kept_at} but label {label!r} (kept: {kept_label!r})"
        else:
            why = f"near duplicate of {kept_at} (estimated Jaccard {sim:.2f} >= {self.o.threshold})"
            if differs:
                why += f", label {label!r} (kept: {kept_label!r})"
        return Reject(code, f"{where(record)}: {why}; the first is kept")

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Deduplicator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def details(self) -> dict:
        out: dict[str, Any] = {
            "params": {"exact": self.o.exact, "near": self.o.near, "threshold": self.o.threshold,
                       "num_perm": self.o.num_perm, "shingles": f"word {self.o.shingle_words}-grams "
                       f"(character 5-grams under {self.o.short_words} words)", "index": self.store.backend},
            "kept": len(self.store), **self.counts, "clusters_total": self.clusters.total,
            "clusters_listed": len(self.clusters.listed), "clusters": list(self.clusters.listed.values())}
        if self.index is not None:
            out["params"]["lsh_bands_rows"] = [self.index.bands, self.index.rows]
        if self.eval is not None:
            out["contamination"] = self.eval.details()
        return out


class _Clusters:
    """Which kept records had duplicates: all counted, the first `cap` clusters listed in full.

    `first_drop(kept)` marks a kept record in the store and says whether it is a new cluster (so the
    count needs no set growing in RAM).
    """

    def __init__(self, cap: int, first_drop):
        self.cap = cap
        self.first_drop = first_drop
        self.total = 0
        self.listed: dict[int, dict] = {}

    def add(self, kept: int, kept_where: str, kept_label: Any, dropped: dict) -> None:
        self.total += self.first_drop(kept)
        entry = self.listed.get(kept)
        if entry is None:
            if len(self.listed) >= self.cap:
                return
            entry = self.listed[kept] = {"kept": kept_where, **({"label": kept_label} if kept_label is not None
                                                                 else {}), "dropped_total": 0, "dropped": []}
        entry["dropped_total"] += 1
        if len(entry["dropped"]) < _MAX_DROPPED_LISTED:
            entry["dropped"].append(dropped)


class EvalIndex:
    """The records of evaluation files, to find training records that leak them."""

    def __init__(self, paths: list[Path], options: DedupOptions):
        self.o = options
        self.paths = [str(p) for p in paths]
        # Evaluation sets are small: always in memory.
        self.store = MemoryStore(options.num_perm)
        self.unreadable = 0
        self.read = 0
        self.index = (MinHashIndex(options.threshold, options.num_perm, options.seed, self.store)
                      if options.near else None)
        self.hits: list[dict] = []
        self.hits_total = 0
        self.eval_hit: set[int] = set()
        for item in read_records(paths):
            if isinstance(item, Problem):
                self.unreadable += 1
                continue
            self.read += 1
            self._add(item)
        if not len(self.store):
            raise DataError(f"{', '.join(self.paths)}: no readable evaluation records to check against")

    def _add(self, record: dict) -> None:
        text = record_key_text(record)
        key = exact_key(text)
        if self.store.exact_get(key) is not None:
            return
        i = self.store.add(where(record), None)
        self.store.exact_put(key, i)
        items = shingles(text, self.o.shingle_words, self.o.short_words)
        if self.index is not None and items:
            self.index.add(i, self.index.minhash(items))

    def match(self, key: bytes, minhash) -> tuple[str, float] | None:
        """(eval file:line, similarity) of the evaluation record a record matches, or None.

        `minhash` is the record's Sketch (None for near off or no shingles); it comes from an index with
        the same seed, threshold and num_perm, so it is comparable with this one's.
        """
        i, sim = self.store.exact_get(key), 1.0
        if i is None:
            best = self.index.best_match(minhash) if self.index is not None and minhash is not None else None
            if best is None:
                return None
            i, sim = best
        self.eval_hit.add(i)
        return self.store.where[i], sim

    def record_hit(self, record: dict, hit: tuple[str, float], dropped: bool) -> None:
        self.hits_total += 1
        if len(self.hits) < self.o.max_report_clusters:
            self.hits.append({"where": where(record), "eval": hit[0], "similarity": round(hit[1], 3),
                              "action": "dropped" if dropped else "flagged"})

    def details(self) -> dict:
        return {"eval_files": self.paths, "eval_records": self.read, "eval_unique": len(self.store),
                "eval_unreadable": self.unreadable,
                "action": "flag" if self.o.keep_contaminated else "drop", "matches_total": self.hits_total,
                "eval_records_matched": len(self.eval_hit), "matches": self.hits}


def dedup(inputs: list[Path], out: Path, options: DedupOptions) -> StageReport:
    """Run the dedup stage over `inputs` into `out` (plus rejects and report); see the module docstring."""
    eval_index = EvalIndex(list(options.eval_files), options) if options.eval_files else None
    backend = choose_backend(options.index, inputs)
    directory = None
    if backend == "disk":  # next to the output: same disk as the data, and the output is ours to write
        directory = Path(out).parent
        directory.mkdir(parents=True, exist_ok=True)
    with Deduplicator(options, eval_index, backend, directory) as state:

        def transform(record: dict):
            reject = state.check(record)
            return reject if reject is not None else [record]

        return run_stage("dedup", read_records(inputs), out, transform, config=options.model_dump(mode="json"),
                         inputs=[*inputs, *options.eval_files], details=state.details)


def choose_backend(index: str, inputs: list[Path]) -> str:
    """'memory' or 'disk' for an `index` option: 'auto' is disk when the inputs total > AUTO_DISK_BYTES."""
    if index != "auto":
        return index
    total = sum(Path(p).stat().st_size for p in inputs if Path(p).is_file())
    return "disk" if total > AUTO_DISK_BYTES else "memory"


def count_near_duplicates(records: Iterable[dict], options: DedupOptions | None = None) -> dict[str, int]:
    """What `hone data dedup` would drop from these records, by code (for data cards); changes nothing."""
    options = options or DedupOptions()
    with Deduplicator(options, backend="disk" if options.index == "disk" else "memory") as dedup_state:
        for record in records:
            dedup_state.check(record)
    c = dedup_state.counts
    return {"exact_duplicates": c["duplicate"], "conflicting_labels": c["conflicting_label"],
            "near_duplicates": c["near_duplicate"]}
