"""`hone data redact`: find PII in every text field of every record and mask it, pseudonymise it, or drop
the record.

    hone data redact tickets.jsonl --out redacted.jsonl [--mode mask|pseudonym|drop] [--types EMAIL,PHONE]

**Engines.** Detection runs on Microsoft Presidio's AnalyzerEngine when it imports and starts here: its own
recognisers for EMAIL (pattern + TLD check), PHONE (libphonenumber), CREDIT_CARD (Luhn), IBAN (mod-97),
IP_ADDRESS, US_SSN and UK_NINO, plus hone's recogniser (pii_patterns.py) for what Presidio lacks:
URL_WITH_TOKEN, SECRET, PERSON in clear contexts, and phone formats libphonenumber's matcher skips. Presidio
gets a blank spaCy pipeline (tokens only, no model download). With `ner_model` (an installed spaCy
pipeline name or a path) Presidio also runs that model's NER for PERSON. If Presidio cannot be imported or
started, the same patterns in pii_patterns.py run directly with `re` for every type; the report says which
engine ran (`details.engine`).

**Replacement** is a splice done here, the same for both engines, so output does not depend on the engine:
`mask` puts `<EMAIL>`; `pseudonym` puts `<EMAIL_3>`, numbered per type in order of first appearance in the
run, so one value always gets the same pseudonym (values are normalised first: a phone number written
two ways is one person). The value-to-number table is keyed by a salted HMAC, so the process never holds a
table of raw values and the pseudonym itself carries nothing of the value. `drop` rejects a record holding
PII (code `pii`) and, because the rejects file stores the record, masks it first: rejects never hold the raw
PII either.

Only human-written text fields are touched (stage.map_texts): labels, ids, meta and provenance pass as is.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hone.data.pii_patterns import (
    PATTERNS,
    PII_TYPES,
    TRIGGERS,
    TYPE_GROUPS,
    Found,
    drop_false_positives,
    find_with_patterns,
    resolve_overlaps,
    triggered_types,
)
from hone.data.readers import DataError
from hone.data.stage import (
    Reject,
    StageReport,
    map_texts,
    read_records,
    record_texts,
    run_stage,
)

MODES = ("mask", "pseudonym", "drop")
# Presidio's entity names -> hone's.
_FROM_PRESIDIO = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "IBAN_CODE": "IBAN"}
_TO_PRESIDIO = {v: k for k, v in _FROM_PRESIDIO.items()}
log = logging.getLogger(__name__)


class RedactOptions(BaseModel):
    """Options of `hone data redact` (also the `redact:` section of a `hone data prepare` recipe)."""

    model_config = ConfigDict(extra="forbid")

    mode: str = Field("mask", description="mask: replace PII with <TYPE>; pseudonym: with <TYPE_N>, the same "
                      "N for the same value across the run; drop: reject records that hold PII (code 'pii').")
    types: list[str] = Field(list(PII_TYPES), description="PII types to detect: " + ", ".join(PII_TYPES)
                             + " (NATIONAL_ID = US_SSN + UK_NINO).")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="Minimum detector score (0-1) for a span to "
                             "count. Checksum-validated spans score 1.0, pattern-only ones 0.6-0.9.")
    allow: list[str] = Field(default_factory=list, description="Values never redacted, compared ignoring case "
                             "and surrounding space (e.g. your own support@ address).")
    engine: str = Field("auto", description="auto: Presidio if it starts, else regex; presidio: Presidio or "
                        "fail; regex: hone's patterns with re only (fastest, no Presidio).")
    known_names: bool = Field(True, description=(
        "Also redact, anywhere in the text, the names of the people the records' meta names (e-mail From/To "
        "display names, Slack user names, ticket customers): a first pass collects them."))
    ner_model: str | None = Field(None, description="An installed spaCy pipeline (name or path) whose NER "
                                  "finds PERSON anywhere (Presidio engine only). Without it, names are found "
                                  "only in clear contexts: greetings, sign-offs, 'my name is', 'Name:' fields.")

    @field_validator("mode")
    @classmethod
    def _known_mode(cls, v: str) -> str:
        if v not in MODES:
            raise ValueError(f"unknown mode {v!r}; use one of {', '.join(MODES)}")
        return v

    @field_validator("engine")
    @classmethod
    def _known_engine(cls, v: str) -> str:
        if v not in ("auto", "presidio", "regex"):
            raise ValueError(f"unknown engine {v!r}; use auto, presidio or regex")
        return v

    @field_validator("types")
    @classmethod
    def _known_types(cls, v: list[str]) -> list[str]:
        out: list[str] = []
        for t in (x.strip().upper() for x in v):
            expanded = TYPE_GROUPS.get(t, (t,))
            for e in expanded:
                if e not in PII_TYPES:
                    raise ValueError(f"unknown PII type {t!r}; known: {', '.join(PII_TYPES + tuple(TYPE_GROUPS))}")
                if e not in out:
                    out.append(e)
        if not out:
            raise ValueError("no PII types given")
        return out


# --- detection -------------------------------------------------------------------------------------------

class Detector:
    """Finds PII spans in one text. `engine` names what runs ("presidio" or "regex")."""

    def __init__(self, options: RedactOptions):
        self.types = list(options.types)
        self.threshold = options.threshold
        self.allow = {a.strip().lower() for a in options.allow}
        self.engine = "regex"
        self.engine_note = ""
        # An NER model finds names without the cue words the PERSON trigger looks for.
        self.triggers = {t: r for t, r in TRIGGERS.items() if not (options.ner_model and t == "PERSON")}
        self._analyze: Callable[[str, list[str]], list[Found]] = self._regex
        if options.engine != "regex":
            try:
                self._analyze = _presidio_analyze(self.types, options.ner_model)
                self.engine = "presidio"
            except DataError:
                raise
            except Exception as e:  # ImportError, or Presidio failing to start: say so, use the patterns
                if options.engine == "presidio":
                    raise DataError(f"Presidio cannot start here: {type(e).__name__}: {e}") from e
                self.engine_note = f"Presidio unavailable ({type(e).__name__}: {e}); used regex patterns"
                log.warning(self.engine_note)
        elif options.ner_model:
            raise DataError("ner_model needs the Presidio engine; drop --engine regex or the model")

    def find(self, text: str) -> list[Found]:
        """Non-overlapping spans above the threshold, allow-listed values left out, in text order."""
        wanted = triggered_types(text, self.types, self.triggers)
        if not wanted:
            return []
        found = [f for f in self._analyze(text, wanted) if f.score >= self.threshold]
        if self.allow:
            found = [f for f in found if text[f.start:f.end].strip().lower() not in self.allow]
        return resolve_overlaps(drop_false_positives(text, found))

    @staticmethod
    def _regex(text: str, types: list[str]) -> list[Found]:
        return find_with_patterns(text, types)


def _presidio_analyze(types: list[str], ner_model: str | None) -> Callable[[str, list[str]], list[Found]]:
    """An analyse function over one reused Presidio AnalyzerEngine with only the recognisers `types` need."""
    _tldextract_offline()
    with _without_optional("torch", "transformers"):
        import presidio_analyzer.predefined_recognizers  # noqa: F401  (the import that pulls torch in)
        import spacy
        from presidio_analyzer import AnalyzerEngine
        from presidio_analyzer.context_aware_enhancers import ContextAwareEnhancer
        from presidio_analyzer.nlp_engine import NlpArtifacts, SpacyNlpEngine

    class KeepScores(ContextAwareEnhancer):
        def enhance_using_context(self, text, raw_results, nlp_artifacts, recognizers, context=None):
            return raw_results

    engine = SpacyNlpEngine(models=[{"lang_code": "en", "model_name": ner_model or "blank:en"}])
    # Already loaded: stops Presidio from looking for (or downloading) a model.
    engine.nlp = {"en": _load_spacy(spacy, ner_model)}
    # Presidio's context enhancer adds 0.35 for words like "number" near a match: it lifted a phone match
    # over the SSN it overlapped ("Social security number 078-05-1120") and moves no other decision at our
    # scores, so scores stay as the recognisers give them. Without an NER model the spaCy pass fed only that
    # enhancer (half of the time): the analyser gets empty artifacts instead.
    no_nlp = None if ner_model else NlpArtifacts(entities=[], tokens=[], tokens_indices=[], lemmas=[],
                                                 nlp_engine=engine, language="en")
    analyzer = AnalyzerEngine(registry=_presidio_registry(types, ner_model), nlp_engine=engine,
                              supported_languages=["en"], context_aware_enhancer=KeepScores(0, 0, 0, 0))

    def analyze(text: str, wanted: list[str]) -> list[Found]:
        results = analyzer.analyze(text, language="en", entities=[_TO_PRESIDIO.get(t, t) for t in wanted],
                                   nlp_artifacts=no_nlp)
        return [Found(r.start, r.end, _FROM_PRESIDIO.get(r.entity_type, r.entity_type), r.score)
                for r in results]

    return analyze


def _presidio_registry(types: list[str], ner_model: str | None):
    """Presidio's recognisers for `types`, hone's patterns beside them, and spaCy NER if a model is given."""
    from presidio_analyzer import EntityRecognizer, RecognizerRegistry, RecognizerResult
    from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, EmailRecognizer, IbanRecognizer,
                                                          IpRecognizer, PhoneRecognizer, SpacyRecognizer,
                                                          UkNinoRecognizer, UsSsnRecognizer)

    class HonePatterns(EntityRecognizer):
        """pii_patterns.py as a Presidio recogniser."""

        def __init__(self, patterns):
            self.patterns = patterns
            names = sorted({_TO_PRESIDIO.get(p.type, p.type) for p in patterns})
            super().__init__(supported_entities=names, name="HonePatterns")

        def load(self) -> None:
            pass

        def analyze(self, text, entities, nlp_artifacts=None):
            wanted = [_FROM_PRESIDIO.get(e, e) for e in entities]
            return [RecognizerResult(_TO_PRESIDIO.get(f.type, f.type), f.start, f.end, f.score)
                    for f in find_with_patterns(text, wanted, self.patterns)]

    # libphonenumber's matcher is the costliest recogniser, and it runs once per region: keep the regions
    # whose national formats tickets here carry (numbers written with +country code match in any region).
    phone = PhoneRecognizer(supported_regions=("US", "GB", "DE"))
    phone.SCORE = 0.75  # libphonenumber validated the number; 0.4 reads as "unsure" next to our scores
    builtin = {"EMAIL": EmailRecognizer(), "PHONE": phone, "CREDIT_CARD": CreditCardRecognizer(),
               "IBAN": IbanRecognizer(), "IP_ADDRESS": IpRecognizer(), "US_SSN": UsSsnRecognizer(),
               "UK_NINO": UkNinoRecognizer()}
    registry = RecognizerRegistry(supported_languages=["en"])
    for t, rec in builtin.items():
        if t in types:
            registry.add_recognizer(rec)
    # Ours for what Presidio lacks, and beside its own for the rest: on the labelled set Presidio alone
    # misses e-mails on TLDs outside the public suffix list (corp.local), 2-series Mastercards, 14-digit
    # Diners cards, Swiss IBANs and Ofcom-reserved UK mobiles; the union keeps the better recall of both.
    ours = [p for p in PATTERNS if p.type in types]
    if ours:
        registry.add_recognizer(HonePatterns(ours))
    if ner_model and "PERSON" in types:
        registry.add_recognizer(SpacyRecognizer(supported_entities=["PERSON"]))
    return registry


def _load_spacy(spacy, ner_model: str | None):
    if not ner_model:
        return spacy.blank("en")
    if not (spacy.util.is_package(ner_model) or Path(ner_model).exists()):
        raise DataError(f"ner_model {ner_model!r} is neither an installed spaCy package nor a folder "
                        "(hone downloads nothing at run time; pip install the model package first)")
    return spacy.load(ner_model)


@contextlib.contextmanager
def _without_optional(*modules: str):
    """Import with `modules` reported missing, where nothing imported them yet. Presidio (and thinc under
    spaCy) import torch and transformers if present, each behind `except ImportError`, for NER engines
    redact does not use: that cost 8 s of CPU per start here, against 1.7 s without. Afterwards the
    modules import normally again."""
    blocked = [m for m in modules if m not in sys.modules]
    for m in blocked:
        sys.modules[m] = None  # type: ignore[assignment]  # makes `import m` raise ImportError
    try:
        yield
    finally:
        for m in blocked:
            if sys.modules.get(m, 0) is None:
                del sys.modules[m]


def _tldextract_offline() -> None:
    """Presidio's e-mail check calls tldextract, which fetches the public suffix list on first use; use the
    snapshot bundled with tldextract instead (no network at run time, no connection-error logs)."""
    import tldextract.tldextract as tld

    if tld.TLD_EXTRACTOR.suffix_list_urls:
        tld.TLD_EXTRACTOR = tld.TLDExtract(suffix_list_urls=(), cache_dir=None)


# --- replacement -----------------------------------------------------------------------------------------

def splice(text: str, spans: Iterable[Found], replacement: Callable[[Found, str], str]) -> str:
    """`text` with each (non-overlapping) span replaced by `replacement(span, value)`."""
    parts, pos = [], 0
    for f in sorted(spans, key=lambda f: f.start):
        parts.append(text[pos:f.start])
        parts.append(replacement(f, text[f.start:f.end]))
        pos = f.end
    parts.append(text[pos:])
    return "".join(parts)


def mask(span: Found, value: str) -> str:
    return f"<{span.type}>"


class Pseudonyms:
    """`<TYPE_N>` per distinct (normalised) value, numbered in order of first appearance within this run."""

    def __init__(self, salt: bytes | None = None):
        self._salt = salt if salt is not None else os.urandom(16)
        self._numbers: dict[bytes, int] = {}
        self.per_type: Counter[str] = Counter()

    def __call__(self, span: Found, value: str) -> str:
        key = hmac.new(self._salt, f"{span.type}\0{normalise(span.type, value)}".encode(), hashlib.sha256).digest()
        if key not in self._numbers:
            self.per_type[span.type] += 1
            self._numbers[key] = self.per_type[span.type]
        return f"<{span.type}_{self._numbers[key]}>"


def normalise(pii_type: str, value: str) -> str:
    """The form two spellings of one value share: digits only for numbers, no spaces, case folded."""
    if pii_type in ("PHONE", "CREDIT_CARD", "US_SSN"):
        return re.sub(r"\D", "", value)
    if pii_type in ("IBAN", "UK_NINO"):
        return re.sub(r"\s", "", value).upper()
    if pii_type in ("EMAIL", "PERSON", "IP_ADDRESS"):
        return " ".join(value.split()).lower()
    return value


# --- records and the stage -------------------------------------------------------------------------------

class RedactState:
    """What one run accumulates: span counts per type, records changed, the pseudonym table."""

    def __init__(self, detector: Detector, options: RedactOptions, salt: bytes | None = None):
        self.detector = detector
        self.options = options
        self.pseudonyms = Pseudonyms(salt)
        self.spans: Counter[str] = Counter()
        self.records_changed = 0
        self.known_names: KnownNames | None = None

    def details(self) -> dict:
        out = {"engine": self.detector.engine, "mode": self.options.mode, "types": self.detector.types,
               "threshold": self.options.threshold, "allow_values": len(self.options.allow),
               "person_detection": (f"spaCy NER ({self.options.ner_model}) + context patterns"
                                    if self.options.ner_model else "context patterns only (no NER model)"),
               "spans_found": {t: self.spans[t] for t in self.detector.types},
               "spans_total": sum(self.spans.values()), "records_changed": self.records_changed}
        if self.options.mode == "pseudonym":
            out["distinct_values"] = dict(self.pseudonyms.per_type)
        if self.detector.engine_note:
            out["engine_note"] = self.detector.engine_note
        if self.known_names is not None:
            out["known_names"] = len(self.known_names.words)
        return out


class KnownNames:
    """Names of the people in the export, learnt from record meta, found as PERSON wherever they appear.

    Support data names its people in structured fields (From: "Ana Silva <ana@...>", a Slack user name, a
    ticket's customer) and then again in free text ("Thanks Ana", "@Tom Becker"), where no pattern
    without an NER model can tell a name from a word. Each name word of 3+ letters is matched whole,
    case-sensitively capitalised as names are written; adjacent name words form one span. A word that the
    texts also use in lower case ("Support" in "Acme Support" next to "support") is a common word, not a
    name, and is left alone.
    """

    META_KEYS = ("from", "to", "cc", "user_name", "user", "customer", "author", "name", "sender", "participants")
    _WORD = re.compile(r"[^\W\d_][\w'’-]*")

    def __init__(self, words: set[str]):
        self.words = words

    @classmethod
    def from_records(cls, records: Iterable) -> KnownNames:
        words: set[str] = set()
        lower: set[str] = set()
        for record in records:
            if not isinstance(record, dict):
                continue
            for text in record_texts(record):
                lower.update(w for w in cls._WORD.findall(text) if w[0].islower())
            meta = record.get("meta")
            if isinstance(meta, dict):
                for key in cls.META_KEYS:
                    for value in (meta.get(key) if isinstance(meta.get(key), list) else [meta.get(key)]):
                        if isinstance(value, str):
                            words.update(cls._name_words(value))
        return cls({w for w in words if w.lower() not in lower})

    @classmethod
    def _name_words(cls, value: str) -> list[str]:
        display = re.sub(r"<[^>]*>|\S+@\S+", " ", value)  # drop the address, keep "Ana Silva"
        return [w for w in cls._WORD.findall(display) if len(w) >= 3 and w[0].isupper()]

    def find(self, text: str) -> list[Found]:
        if not self.words:
            return []
        spans: list[Found] = []
        for m in self._WORD.finditer(text):
            if m.group() in self.words:
                if spans and text[spans[-1].end:m.start()] == " ":
                    spans[-1] = Found(spans[-1].start, m.end(), "PERSON", 0.85)
                else:
                    spans.append(Found(m.start(), m.end(), "PERSON", 0.85))
        return spans


def redact_text(text: str, state: RedactState, *, pseudonymise: bool = False) -> str:
    """`text` with its PII replaced per the run's mode (mask for drop mode too); counts the spans."""
    spans = state.detector.find(text)
    if state.known_names is not None:
        names = state.known_names.find(text)
        if names:
            spans = resolve_overlaps(spans + names)
    if not spans:
        return text
    state.spans.update(f.type for f in spans)
    pseudonym = pseudonymise or state.options.mode == "pseudonym"
    return splice(text, spans, state.pseudonyms if pseudonym else mask)


# meta keys that link records (threads): pseudonymised even in mask mode, so threads still join up
# after redaction while the ids (which often hold addresses) do not leak.
_LINK_KEYS = ("thread", "message_id", "in_reply_to", "references")


def _redact_meta(value, state: RedactState, key: str = ""):
    if isinstance(value, str):
        return redact_text(value, state, pseudonymise=key in _LINK_KEYS)
    if isinstance(value, list):
        return [_redact_meta(v, state, key) for v in value]
    if isinstance(value, dict):
        return {k: _redact_meta(v, state, k) for k, v in value.items()}
    return value


def redact_record(record: dict, state: RedactState) -> list[dict] | Reject:
    """One record with every text field and every meta value redacted, or (drop mode) a Reject if it
    held any PII. Provenance is kept as is: it points into the raw export, which holds the PII anyway."""
    before = Counter(state.spans)
    new = map_texts(record, lambda t: redact_text(t, state))
    if isinstance(new.get("meta"), dict):
        new["meta"] = _redact_meta(new["meta"], state)
    found = state.spans - before
    if not found:
        return [record]
    state.records_changed += 1
    if state.options.mode != "drop":
        return [new]
    types = ", ".join(f"{t} {n}" for t, n in sorted(found.items()))
    # The runner writes the *input* record to the rejects file: make it the masked one, so the rejects
    # file never holds the PII this mode exists to keep out.
    record.clear()
    record.update(new)
    return Reject("pii", f"record holds PII ({types}); stored masked here")


def redact(inputs: list[Path], out: Path, options: RedactOptions) -> StageReport:
    """The stage: read `inputs`, write redacted records to `out` (+ rejects and report)."""
    inputs = [Path(p) for p in inputs]
    for p in inputs:
        if not p.exists():
            raise DataError(f"{p}: input not found")
    state = RedactState(Detector(options), options)
    if options.known_names and "PERSON" in state.detector.types:
        state.known_names = KnownNames.from_records(read_records(inputs))
    config = {"stage": "redact", **options.model_dump(exclude={"allow"}),
              # allow-listed values may themselves be addresses: keep their hash, not the values
              "allow_sha256": hashlib.sha256("\n".join(sorted(options.allow)).encode()).hexdigest()}
    return run_stage("redact", read_records(inputs), out, lambda r: redact_record(r, state), config=config,
                     inputs=inputs, details=state.details)


def count_pii(records: Iterable[dict], options: RedactOptions | None = None) -> dict[str, int]:
    """PII spans per type over the records' text fields, and how many records hold any (for the dataset
    card: how much PII is left). Defaults to the regex engine: same patterns, no Presidio start-up."""
    detector = Detector(options or RedactOptions(engine="regex"))
    counts: Counter[str] = Counter()
    with_pii = 0
    for record in records:
        found = [f.type for text in record_texts(record) for f in detector.find(text)]
        counts.update(found)
        with_pii += bool(found)
    return {**{t: counts[t] for t in detector.types if counts[t]}, "records_with_pii": with_pii}
