"""`hone data synth`: turn documents that are not Q&A into Q&A pairs, written by a teacher model and kept
only when the document supports the answer.

    documents -> chunks (chunk.py) -> teacher writes N "Q:/A:" pairs per chunk -> parse -> grounding filter

The teacher is a local model hone can load (default: the embedded smollm2-135m-instruct; any model
directory, .gguf or run directory) or an OpenAI-compatible endpoint (`--teacher-url URL --api-key KEY
--teacher-model NAME`), called with retries and backoff on 429/5xx. The filter (`check_pair`, pure) keeps
an answer when at least `min_support` of its content words (stop-words removed, lowercased, lightly
stemmed) occur in the chunk, and it is neither empty nor a restatement of the question; a question already
asked (normalised) is a duplicate. Kept records are

    {"messages": [user question, assistant answer],
     "meta": {"chunk": i, "chunk_start": s, "chunk_end": e, "chunk_text": ..., "support": 0.92, "teacher": ...},
     "provenance": {<the document's provenance>, "chunk": i}}

**Counts.** The unit of `in` is the *candidate*: each pair the teacher wrote is one, and so is each chunk
whose output held no parseable pair (rejected `unparseable_output`, raw output in the message) and each
input record that is not a usable document (`not_a_document`, `empty`, or a reader problem). So
`in == passed (pairs kept) + rejected (pairs refused by reason + unparseable chunks + bad documents)` holds
exactly, and every rejected pair is in the rejects file with its reason. The report's details add the
document-level view: documents read, chunks, pairs generated, pairs kept, acceptance rate, seconds per chunk.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from hone.config import EMBEDDED_MODEL
from hone.data.chunk import chunk_text, read_documents
from hone.data.readers import clip_raw
from hone.data.stage import Reject, StageReport, run_stage, where
from hone.records import Message, Problem


class TeacherError(ValueError):
    """The teacher cannot be used (endpoint refuses the key, wrong URL, unreachable), phrased for the user."""


class SynthOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    teacher: str = Field(EMBEDDED_MODEL, description=(
        "Local teacher model: the embedded model's name, a model directory, a .gguf file or a hone run dir."))
    teacher_url: str | None = Field(None, description=(
        "OpenAI-compatible endpoint base URL (e.g. https://api.openai.com/v1); used instead of `teacher`."))
    api_key: str | None = Field(None, description="API key for teacher_url (never written to the report).")
    teacher_model: str | None = Field(None, description="Model name sent to teacher_url.")
    pairs_per_chunk: int = Field(3, ge=1, le=20, description="Question/answer pairs asked for per chunk.")
    chunk_chars: int = Field(1500, ge=100, description="Largest chunk given to the teacher, in characters.")
    chunk_overlap: int = Field(150, ge=0, description="Characters of a chunk's end repeated in the next chunk.")
    min_support: float = Field(0.7, ge=0, le=1, description=(
        "Share of an answer's content words that must occur in the chunk for the answer to be kept."))
    max_chunks: int | None = Field(None, ge=1, description="Stop after this many chunks (a trial run on a "
                                   "big corpus); the report says so.")
    max_new_tokens: int | None = Field(None, ge=16, description=(
        "Longest teacher output per chunk, in tokens; default 64 per pair asked for."))
    temperature: float = Field(0.2, ge=0, le=2, description="Endpoint sampling temperature (local: greedy).")
    batch_size: int = Field(4, ge=1, description=(
        "Chunks handled together: one generation batch for a local teacher, concurrent requests to an endpoint."))
    timeout_s: float = Field(120, gt=0, description="Endpoint: seconds to wait for one reply.")
    retries: int = Field(4, ge=0, description="Endpoint: retries on 429, 5xx and network errors.")
    retry_wait_s: float = Field(1.0, ge=0, description="Endpoint: first backoff wait; doubles each retry.")


# --- prompting and parsing ----------------------------------------------------------------------------------

SYSTEM_PROMPT = "You write questions and answers about a text. Every answer is copied from the text."
# One worked example: small teachers (the embedded 135M model) follow a shown format far better than a
# described one; large ones lose nothing by it.
_EXAMPLE_TEXT = ("The library opens at 9 a.m. and closes at 6 p.m. on weekdays. Members can borrow up to five "
                 "books for three weeks.")
_EXAMPLE_PAIRS = ("Q: When does the library open on weekdays?\nA: At 9 a.m.\n"
                  "Q: How many books can members borrow?\nA: Up to five books, for three weeks.")


def teacher_prompt(chunk: str, n: int) -> list[Message]:
    """The messages asking for `n` pairs about `chunk`, in the "Q:/A:" format `parse_pairs` reads."""
    ask = "Write {n} questions about the text, each with its answer."
    return [Message("system", SYSTEM_PROMPT),
            Message("user", f"Text:\n{_EXAMPLE_TEXT}\n\n{ask.format(n=2)}"),
            Message("assistant", _EXAMPLE_PAIRS),
            Message("user", f"Text:\n{chunk}\n\n{ask.format(n=n)}")]


_PREFIX = re.compile(r"^\s*(?:[-*•]\s*|\d+\s*[.)]\s*|#+\s*)*(?:\*\*|__)?\s*(?P<tag>q|question|a|answer)"
                     r"(?:\s*\d+)?\s*(?:\*\*|__)?\s*(?:[:.)-]\s*(?:\*\*|__)?\s*(?P<rest>.*)|(?P<bare>))$",
                     re.IGNORECASE)
_FENCE = re.compile(r"^```[\w-]*\s*$|^```\s*$", re.MULTILINE)


def parse_pairs(output: str) -> list[tuple[str, str]]:
    """(question, answer) pairs from a teacher's output: JSON (an array, an object holding one, or JSON
    lines, with question/answer or q/a keys, possibly in a code fence) or "Q:/A:" lines, tolerating
    numbering, bullets, bold markers and multi-line answers. Returns [] when nothing parses."""
    text = _FENCE.sub("", output).strip()
    pairs = _json_pairs(text)
    return pairs if pairs else _tagged_pairs(text)


def _json_pairs(text: str) -> list[tuple[str, str]]:
    values = []
    try:
        values.append(json.loads(text))
    except json.JSONDecodeError:
        for line in text.splitlines():
            try:
                values.append(json.loads(line.strip().rstrip(",")))
            except json.JSONDecodeError:
                continue
    pairs = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        if isinstance(value, dict):
            nested = [v for v in value.values() if isinstance(v, list)]
            items = nested[0] if nested and not _qa_of(value) else [value]
        pairs.extend(p for p in (_qa_of(i) for i in items) if p)
    return pairs


def _qa_of(item) -> tuple[str, str] | None:
    if not isinstance(item, dict):
        return None
    low = {str(k).lower(): v for k, v in item.items()}
    q = next((low[k] for k in ("question", "q") if isinstance(low.get(k), str)), None)
    a = next((low[k] for k in ("answer", "a") if isinstance(low.get(k), str)), None)
    return (q.strip(), a.strip()) if q is not None and a is not None else None


def _tagged_pairs(text: str) -> list[tuple[str, str]]:
    pairs, question, answer, part = [], None, None, None
    for line in text.splitlines():
        m = _PREFIX.match(line)
        tag = m.group("tag").lower()[0] if m else None
        if tag == "q":
            if question is not None and answer is not None:
                pairs.append((question, answer))
            question, answer, part = m.group("rest") or "", None, "q"
        elif tag == "a" and question is not None:
            answer, part = m.group("rest") or "", "a"
        elif part == "a" and line.strip():
            answer = f"{answer}\n{line.strip()}".strip()
        elif part == "q" and line.strip():
            question = f"{question} {line.strip()}".strip()
    if question is not None and answer is not None:
        pairs.append((question, answer))
    return [(_strip_marks(q), _strip_marks(a)) for q, a in pairs]


def _strip_marks(text: str) -> str:
    return re.sub(r"^(?:\*\*|__)|(?:\*\*|__)$", "", text.strip()).strip().strip('"').strip()


# --- the grounding filter (pure) -------------------------------------------------------------------------

STOP_WORDS = frozenset("""a about above after again against all also am an and any are aren't as at be because
been before being below between both but by can could did do does doing done down during each else etc few for
from further had has have having he her here hers herself him himself his how however i if in into is isn't it
its itself just let me more most much must my myself no nor not now of off on once only or other our ours
ourselves out over own per same shall she should so some such than that the their theirs them themselves then
there these they this those through thus to too under until up upon us very via was we were what when where
which while who whom whose why will with within without would yes you your yours yourself yourselves""".split())  # noqa: SIM905
_WORDS = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
_SUFFIXES = (("ies", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", ""), ("ly", ""))


def stem(word: str) -> str:
    """A light, consistent stemmer: enough that 'invoices'/'invoice' and 'charged'/'charge' meet."""
    word = word.lower().removesuffix("'s")
    for suffix, repl in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)] + repl
            break
    return word.rstrip("e") if len(word) > 3 else word


def content_words(text: str) -> set[str]:
    """Stemmed, lowercased words of `text` that are not stop-words."""
    return {stem(w) for w in _WORDS.findall(text.lower()) if w not in STOP_WORDS}


def support(answer: str, chunk_words: set[str]) -> float:
    """Share of the answer's content words found in the chunk (0.0 for an answer with none)."""
    words = content_words(answer)
    return len(words & chunk_words) / len(words) if words else 0.0


def normalise_question(question: str) -> str:
    return " ".join(_WORDS.findall(question.lower()))


def check_pair(question: str, answer: str, chunk_words: set[str], min_support: float,
               seen_questions: set[str]) -> Reject | float:
    """The pair's support (kept) or why it is refused: empty, answer_is_question, unsupported_answer,
    duplicate_question. A kept question is added to `seen_questions`."""
    answer_words, question_words = content_words(answer), content_words(question)
    if not normalise_question(question) or not answer_words:
        which = "question" if not normalise_question(question) else "answer"
        return Reject("empty", f"{which} is empty or has no content words: Q: {question!r} A: {answer!r}")
    if answer_words <= question_words or answer.rstrip().endswith("?"):
        return Reject("answer_is_question", f"the answer is a question or only repeats the question: "
                      f"Q: {question!r} A: {answer!r}")
    score = len(answer_words & chunk_words) / len(answer_words)
    if score < min_support:
        missing = ", ".join(sorted(answer_words - chunk_words)[:12])
        return Reject("unsupported_answer", f"only {score:.0%} of the answer's content words occur in the chunk "
                      f"(need {min_support:.0%}); not in the chunk: {missing}")
    key = normalise_question(question)
    if key in seen_questions:
        return Reject("duplicate_question", f"question already asked: {question!r}")
    seen_questions.add(key)
    return score


def output_budget(options: SynthOptions) -> int:
    # Small teachers repeat their last pair until the budget runs out: a budget sized to the pairs asked for
    # bounds that waste, and 64 tokens is room for a question and a sentence-long answer.
    return options.max_new_tokens or 64 * options.pairs_per_chunk


# --- teachers --------------------------------------------------------------------------------------------

Teacher = Callable[[list[list[Message]]], list[str]]


def local_teacher(name: str, options: SynthOptions) -> tuple[Teacher, str]:
    """A hone-loadable model generating greedily with hone.eval.runners.generate."""
    from hone.eval.runners import generate
    from hone.models.load import load_model

    loaded = load_model(name)

    def ask(prompts: list[list[Message]]) -> list[str]:
        return generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=output_budget(options),
                        batch_size=options.batch_size)

    return ask, loaded.description


class EndpointTeacher:
    """An OpenAI-compatible /chat/completions endpoint: one request per prompt, `batch_size` of them in
    flight at once (threads; httpx's client is thread-safe), each with retries and backoff."""

    def __init__(self, options: SynthOptions, sleep: Callable[[float], None] = time.sleep):
        import httpx

        if not options.teacher_model:
            raise TeacherError("--teacher-url needs --teacher-model (the model name the endpoint serves)")
        self.url = options.teacher_url.rstrip("/") + "/chat/completions"
        self.options, self.sleep = options, sleep
        headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else {}
        self.client = httpx.Client(timeout=options.timeout_s, headers=headers)
        self.requests = 0
        self.retried = 0
        self._count_lock = threading.Lock()  # requests run on several threads

    def __call__(self, prompts: list[list[Message]]) -> list[str]:
        if len(prompts) <= 1:
            return [self.complete(p) for p in prompts]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(len(prompts), self.options.batch_size)) as pool:
            return list(pool.map(self.complete, prompts))  # map keeps the prompts' order

    def complete(self, messages: list[Message]) -> str:
        import httpx

        body = {"model": self.options.teacher_model, "temperature": self.options.temperature,
                "max_tokens": output_budget(self.options),
                "messages": [{"role": m.role, "content": m.content} for m in messages]}
        for attempt in range(self.options.retries + 1):
            last = attempt == self.options.retries
            with self._count_lock:
                self.requests += 1
            try:
                response = self.client.post(self.url, json=body)
            except httpx.TransportError as e:
                if last:
                    raise TeacherError(f"cannot reach {self.url}: {e}") from None
                self._wait(attempt, None)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                if last:
                    raise TeacherError(f"{self.url}: HTTP {response.status_code} after "
                                       f"{self.options.retries + 1} tries: {response.text[:300]}")
                self._wait(attempt, response.headers.get("retry-after"))
                continue
            return self._content(response)
        raise AssertionError("unreachable")

    def _wait(self, attempt: int, retry_after: str | None) -> None:
        with self._count_lock:
            self.retried += 1
        try:
            wait = float(retry_after) if retry_after else self.options.retry_wait_s * 2 ** attempt
        except ValueError:
            wait = self.options.retry_wait_s * 2 ** attempt
        self.sleep(min(wait, 60.0))

    def _content(self, response) -> str:
        code = response.status_code
        if code in (401, 403):
            raise TeacherError(f"{self.url}: HTTP {code}: the endpoint refused the API key; check --api-key")
        if code == 404:
            raise TeacherError(f"{self.url}: HTTP 404: check --teacher-url (an OpenAI-compatible base URL "
                               f"usually ends in /v1) and --teacher-model '{self.options.teacher_model}'")
        if code >= 400:
            raise TeacherError(f"{self.url}: HTTP {code}: {response.text[:300]}")
        try:
            return response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise TeacherError(f"{self.url}: reply is not an OpenAI chat.completion: {response.text[:300]}") from None


def make_teacher(options: SynthOptions) -> tuple[Teacher, str]:
    if options.teacher_url:
        teacher = EndpointTeacher(options)
        return teacher, f"endpoint:{options.teacher_url} model:{options.teacher_model}"
    return local_teacher(options.teacher, options)


# --- the stage -------------------------------------------------------------------------------------------

def synth(inputs: list[Path], out: Path, options: SynthOptions, teacher: Teacher | None = None) -> StageReport:
    """Generate grounded Q&A for every document of `inputs`; see the module docstring for the counts."""
    description = "given"
    if teacher is None:
        teacher, description = make_teacher(options)
    stats = {"documents": 0, "documents_used": 0, "chunks": 0, "pairs_generated": 0, "unparseable_chunks": 0,
             "pairs_kept": 0, "pairs_beyond_requested": 0,
             "seconds_generating": 0.0, "stopped_at_max_chunks": False}
    seen: set[str] = set()

    def keep_grounded(record: dict) -> list[dict] | Reject:
        question, answer = (m["content"] for m in record["messages"])
        result = check_pair(question, answer, content_words(record["meta"]["chunk_text"]),
                            options.min_support, seen)
        if isinstance(result, Reject):
            return Reject(result.code, f"{where(record)}: {result.message}")
        record["meta"]["support"] = round(result, 3)
        stats["pairs_kept"] += 1
        return [record]

    config = {"stage": "synth", **options.model_dump(exclude={"api_key"}), "teacher_used": description}
    candidates = synth_candidates(read_documents(inputs), teacher, options, stats, description)
    return run_stage("synth", candidates, out, keep_grounded, config=config, inputs=inputs,
                     details=lambda: _details(stats, description))


def _details(stats: dict, description: str) -> dict:
    chunks = stats["chunks"]
    per_chunk = round(stats["seconds_generating"] / chunks, 2) if chunks else None
    generated = stats["pairs_generated"]
    rate = round(stats["pairs_kept"] / generated, 3) if generated else None
    return {**stats, "seconds_generating": round(stats["seconds_generating"], 2), "seconds_per_chunk": per_chunk,
            "acceptance_rate": rate, "teacher": description}


def synth_candidates(documents: Iterator[dict | Problem], teacher: Teacher, options: SynthOptions,
                     stats: dict, description: str = "") -> Iterator[dict | Problem]:
    """Candidate pair records (and Problems for unusable documents and unparseable outputs), teacher
    called on `batch_size` chunks at a time."""
    batch: list[tuple[dict, object]] = []
    for doc in documents:
        if stats["stopped_at_max_chunks"]:
            break
        stats["documents"] += 1
        if isinstance(doc, Problem):
            yield doc
            continue
        text = doc.get("text")
        if not isinstance(text, str) or not text.strip():
            prov = doc.get("provenance") or {}
            code = "empty" if isinstance(text, str) else "not_a_document"
            yield Problem(str(prov.get("source")), prov.get("line") or 0, code,
                          f"{where(doc)}: expected a document with a non-empty 'text' string",
                          raw=clip_raw(json.dumps(doc, ensure_ascii=False, default=str)))
            continue
        stats["documents_used"] += 1
        for chunk in chunk_text(text, max_size=options.chunk_chars,
                                overlap=min(options.chunk_overlap, options.chunk_chars // 2)):
            if options.max_chunks is not None and stats["chunks"] >= options.max_chunks:
                stats["stopped_at_max_chunks"] = True
                break
            stats["chunks"] += 1
            batch.append((doc, chunk))
            if len(batch) >= options.batch_size:
                yield from _ask(batch, teacher, options, stats, description)
                batch = []
    if batch:
        yield from _ask(batch, teacher, options, stats, description)


def _ask(batch: list, teacher: Teacher, options: SynthOptions, stats: dict,
         description: str) -> Iterator[dict | Problem]:
    started = time.perf_counter()
    outputs = teacher([teacher_prompt(chunk.text, options.pairs_per_chunk) for _, chunk in batch])
    stats["seconds_generating"] += time.perf_counter() - started
    for (doc, chunk), output in zip(batch, outputs):
        prov = {**(doc.get("provenance") or {}), "chunk": chunk.index}
        pairs = parse_pairs(output)
        if not pairs:
            stats["unparseable_chunks"] += 1
            yield Problem(str(prov.get("source")), prov.get("line") or 0, "unparseable_output",
                          f"{where(doc)} chunk {chunk.index}: no 'Q:/A:' pair or JSON pair in the teacher's "
                          f"output: {output[:500]!r}", raw=clip_raw(output))
            continue
        # A teacher writing more than asked is usually repeating itself (small models loop): the first
        # `pairs_per_chunk` are the candidates; the surplus is counted in the report, not judged.
        stats["pairs_beyond_requested"] += max(0, len(pairs) - options.pairs_per_chunk)
        pairs = pairs[:options.pairs_per_chunk]
        stats["pairs_generated"] += len(pairs)
        meta = {**(doc.get("meta") or {}), "chunk": chunk.index, "chunk_start": chunk.start,
                "chunk_end": chunk.end, "chunk_text": chunk.text, "teacher": description}
        for question, answer in pairs:
            yield {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                   "meta": dict(meta), "provenance": prov}
