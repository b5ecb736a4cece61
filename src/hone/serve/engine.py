"""Batched generation for many fine-tuned models over few loaded bases.

    engine = InferenceEngine()                                   # one worker thread; models load on demand
    pending = engine.submit(GenerationRequest(model="runs/support-lora", messages=[...], max_tokens=64))
    for piece in pending.stream(): ...                           # text deltas as tokens are decoded
    completion = pending.result()                                # text, finish_reason, token counts

`model` is anything `hone.models.load.load_model` accepts. A run (or bare peft directory) holding a LoRA or
DoRA adapter is served over its base: the base loads once, each adapter is attached to it with peft's
`load_adapter` under its own name, and one forward pass serves rows for different adapters and for the plain
base together (peft's mixed-adapter batches: `adapter_names=[...]`, `"__base__"` for no adapter). Everything
else (full-weight runs, other adapter types, plain models) loads as its own model.

Requests queue up; the worker takes the oldest one, waits `batch_window_s` for company, and batches every
waiting request that runs on the same loaded model (up to `max_batch_size`). Decoding is hone's own loop
rather than `generate()`, so each row keeps its own sampling settings, seed, stop strings and token budget,
streams as it goes, and leaves the batch (its KV cache rows dropped) when it finishes. Greedy rows match what
`generate()` gives for the model loaded alone (tests/test_serve_engine.py checks token equality).

Loaded models and adapters are kept in LRU order: `max_models` models, `max_adapters` adapters per model.
All model state is touched by the worker thread only; `submit` and the Pending handles are thread-safe and
usable from asyncio (`Pending.aevents`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable, Iterator

import torch

from hone.models.load import Loaded, ModelError, load_model
from hone.serve.decode import IncrementalText, decode_batch

log = logging.getLogger(__name__)

BASE = "__base__"  # peft's row name for "no adapter" in a mixed batch
# peft adapter types whose layers take per-row `adapter_names` (LoRA, DoRA and QLoRA adapters all say LORA).
MIXED_BATCH_TYPES = ("LORA",)


class RequestError(ValueError):
    """A request the engine refuses, phrased for the caller; `param` names the offending field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class GenerationRequest:
    model: str  # what load_model takes: an embedded name, an HF dir, a .gguf file, a run dir
    prompt: str | None = None  # raw text (completions) ...
    messages: list[dict] | None = None  # ... or chat messages, rendered with the model's chat template
    max_tokens: int | None = None  # None: the engine's default, cut to what the context leaves
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # sampling seed: the same seed gives the same text, whatever else is batched


@dataclass
class Completion:
    text: str
    finish_reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]  # every sampled token, an end-of-turn token included


class Cancelled(Exception):
    pass


# --- a request's handle: events from the worker thread to any thread or event loop -----------------------


class Pending:
    """Events for one request: ("start", prompt_tokens), ("delta", text)..., then ("done", Completion) or
    ("error", exception). Readable from threads (`events`) and from asyncio (`aevents`), any number of times."""

    def __init__(self):
        self._events: list[tuple[str, object]] = []
        self._cond = threading.Condition()
        self._loops: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False
        self.finished_at: float | None = None  # time.perf_counter() at the last event (for latency figures)

    def _push(self, kind: str, value) -> None:
        with self._cond:
            if self._events and self._events[-1][0] in ("done", "error"):
                return  # terminal: a late event (say, a failure after a cancel) changes nothing
            self._events.append((kind, value))
            if kind in ("done", "error"):
                self.finished_at = time.perf_counter()
            self._cond.notify_all()
            loops = list(self._loops)
        for loop, event in loops:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed; its reader is gone
                pass

    def cancel(self) -> None:
        """Stop generating for this request (a client went away); it ends with finish_reason 'cancelled'."""
        self.cancelled = True

    @property
    def finished(self) -> bool:
        with self._cond:
            return bool(self._events) and self._events[-1][0] in ("done", "error")

    def events(self, timeout: float | None = None) -> Iterator[tuple[str, object]]:
        i = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._cond:
                while i >= len(self._events):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError("no answer from the inference engine in time")
                    self._cond.wait(left)
                new = self._events[i:]
            i += len(new)
            for kind, value in new:
                if kind == "error":
                    raise value
                yield kind, value
                if kind == "done":
                    return

    async def aevents(self) -> AsyncIterator[tuple[str, object]]:
        loop, wake = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._loops.append((loop, wake))
        i = 0
        try:
            while True:
                wake.clear()
                with self._cond:
                    new = self._events[i:]
                if not new:
                    await wake.wait()
                    continue
                i += len(new)
                for kind, value in new:
                    if kind == "error":
                        raise value
                    yield kind, value
                    if kind == "done":
                        return
        finally:
            with self._cond:
                self._loops.remove((loop, wake))

    def stream(self, timeout: float | None = None) -> Iterator[str]:
        for kind, value in self.events(timeout):
            if kind == "delta":
                yield value

    def result(self, timeout: float | None = None) -> Completion:
        for kind, value in self.events(timeout):
            if kind == "done":
                return value
        raise RuntimeError("request ended without a result")


# --- one request inside a running batch ---------------------------------------------------------------------


class _Row:
    def __init__(self, job: "_Job", prompt_ids: list[int], max_new: int, stop_ids: set[int], tokenizer):
        req = job.request
        self.job = job
        self.prompt_ids = prompt_ids
        self.max_new = max_new
        self.stop_ids = stop_ids
        self.temperature = req.temperature
        self.top_p = req.top_p
        self.generator = torch.Generator().manual_seed(
            req.seed if req.seed is not None else secrets.randbits(63))
        self.text = IncrementalText(tokenizer, req.stop)
        self.sampled: list[int] = []
        self.sent_parts: list[str] = []
        self.adapter = job.target.adapter  # its adapter directory, and peft's name for it in this batch
        self.name = BASE

    def push(self, token: int) -> bool:
        """Take the next token; False once this row has finished (its Completion is sent)."""
        self.sampled.append(token)
        if token in self.stop_ids:
            return self._finish("stop", self.text.flush())
        delta, hit_stop = self.text.add(token)
        if hit_stop:
            return self._finish("stop", delta)
        self._emit(delta)
        if len(self.sampled) >= self.max_new:
            return self._finish("length", self.text.flush())
        if self.job.pending.cancelled:
            return self._finish("cancelled", "")
        return True

    def _emit(self, delta: str) -> None:
        if delta:
            self.sent_parts.append(delta)
            self.job.pending._push("delta", delta)

    def _finish(self, reason: str, delta: str) -> bool:
        self._emit(delta)
        self.job.count(**{f"finished_{reason}": 1})
        self.job.pending._push("done", Completion("".join(self.sent_parts), reason, len(self.prompt_ids),
                                                  len(self.sampled), list(self.sampled)))
        return False


# --- what a model key names ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    family: str  # the loaded model that runs the forward pass (a base, or a standalone model)
    adapter: str | None = None  # a peft adapter directory attached to that model, or None


def resolve_target(key: str) -> Target:
    """Which loaded model serves `key`, and which adapter on it. Reads small files only."""
    p = Path(key).expanduser()
    if not p.exists():
        return Target(key)  # the embedded model's name, or a hub id: load_model decides
    p = p.resolve()
    if (p / "config.yaml").is_file() and (p / "final" / "adapter_config.json").is_file():
        import yaml

        adapter, base = p / "final", (yaml.safe_load((p / "config.yaml").read_text()) or {}).get(
            "model", {}).get("base")
    elif (p / "adapter_config.json").is_file():
        adapter, base = p, None
    else:
        return Target(str(p))
    try:
        config = json.loads((adapter / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{adapter}/adapter_config.json cannot be read: {e}") from e
    base = base or config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{p}: an adapter without a base model (no model.base in config.yaml, no "
                         "base_model_name_or_path in adapter_config.json)")
    base_target = resolve_target(str(base))
    if config.get("peft_type") not in MIXED_BATCH_TYPES or base_target.adapter is not None:
        if adapter == p:
            raise ModelError(f"{p}: a {config.get('peft_type')} adapter can only be served from its run directory")
        return Target(str(p))  # loads on its own copy of the base (load_model's run path)
    return Target(base_target.family, str(adapter))


def context_length(model) -> int:
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def stop_token_ids(model, tokenizer) -> set[int]:
    from hone.eval.runners import stop_token_ids as ids

    return set(ids(model, tokenizer))


@dataclass
class _Job:
    request: GenerationRequest
    target: Target
    pending: Pending
    count: Callable[..., None] = lambda **_: None  # the engine's stats counter


class _Family:
    """One loaded model and the adapters attached to it (LRU order: least recently used first)."""

    def __init__(self, key: str, loaded: Loaded):
        self.key = key
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.peft = None  # the PeftModel wrapping `model` once an adapter is attached
        self.adapters: OrderedDict[str, str] = OrderedDict()  # adapter dir -> peft adapter name
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)

    def runner(self):
        return self.peft if self.peft is not None else self.model



# --- the engine -------------------------------------------------------------------------------------------


class InferenceEngine:
    """A request queue, one worker thread that batches and decodes, and the LRU of loaded models/adapters.

    loader: how a model key becomes a Loaded (load_model; tests pass a counting wrapper).
    max_models: loaded models kept (bases and standalone models); the least recently used goes first.
    max_adapters: adapters kept attached per loaded model; also the most adapters one batch mixes.
    max_batch_size: rows decoded together. batch_window_s: how long the oldest request waits for company.
    default_max_tokens: the budget when a request names none (cut to what the context leaves).
    device: where models run (default: CUDA when present). bf16: autocast the forward passes to bf16.
    start: False leaves the worker stopped until start() (tests queue requests first, to batch them).
    """

    def __init__(self, *, loader: Callable[[str], Loaded] | None = None, max_models: int = 2,
                 max_adapters: int = 8, max_batch_size: int = 8, batch_window_s: float = 0.01,
                 default_max_tokens: int = 256, device: str | torch.device | None = None, bf16: bool = False,
                 start: bool = True):
        from hone.train.device import pick_device

        if max_models < 1 or max_adapters < 1 or max_batch_size < 1:
            raise ValueError("max_models, max_adapters and max_batch_size must be at least 1")
        self.loader = loader or load_model
        self.max_models, self.max_adapters, self.max_batch_size = max_models, max_adapters, max_batch_size
        self.batch_window_s = batch_window_s
        self.default_max_tokens = default_max_tokens
        self.device = torch.device(device) if device is not None else pick_device()
        self.bf16 = bf16
        self._waiting: list[_Job] = []
        self._cond = threading.Condition()
        self._closed = False
        # Changed by the worker thread only, under _state_lock so that loaded() can read it from any thread.
        self._families: OrderedDict[str, _Family] = OrderedDict()
        self._state_lock = threading.Lock()
        self._unloads: list[tuple[Target, threading.Event]] = []
        self._targets: dict[str, Target] = {}  # model key -> target, so unload() works after files are gone
        self._stats_lock = threading.Lock()
        self._stats = {"requests": 0, "batches": 0, "rows": 0, "max_batch": 0, "model_loads": 0,
                       "adapter_loads": 0, "model_evictions": 0, "adapter_evictions": 0, "failures": 0,
                       "joined": 0, "finished_stop": 0, "finished_length": 0, "finished_cancelled": 0}
        self._thread: threading.Thread | None = None
        self._running: list[_Job] = []
        if start:
            self.start()

    # --- the public face (any thread) ---

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="hone-inference", daemon=True)
            self._thread.start()

    def submit(self, request: GenerationRequest) -> Pending:
        """Queue a request; returns at once. Bad parameters raise RequestError, unknown models ModelError."""
        check_request(request)
        job = _Job(request, resolve_target(request.model), Pending(), self._count)
        with self._cond:
            if self._closed:
                raise RuntimeError("the inference engine is closed")
            self._targets[request.model] = job.target
            self._waiting.append(job)
            self._cond.notify_all()
        self._count(requests=1)
        return job.pending

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
        return self.submit(request).result(timeout)

    def unload(self, model: str, timeout: float | None = 60.0) -> bool:
        """Drop a model (or an adapter) from memory, e.g. when it is deleted; True once done. Requests that
        name it later load it again. Works after its files are gone, for models this engine has served."""
        with self._cond:
            target = self._targets.pop(model, None)
        if target is None:
            try:
                target = resolve_target(model)
            except ModelError:
                return False
        done = threading.Event()
        with self._cond:
            self._unloads.append((target, done))
            self._cond.notify_all()
        return done.wait(timeout)

    def loaded(self) -> dict[str, list[str]]:
        """{loaded model key: [adapter directories attached to it]}, least recently used first."""
        with self._state_lock:
            return {key: list(f.adapters) for key, f in self._families.items()}

    def stats(self) -> dict:
        with self._stats_lock:
            return dict(self._stats)

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is running, fail what waits, stop the worker."""
        with self._cond:
            self._closed = True
            waiting, self._waiting = self._waiting, []
            self._cond.notify_all()
        for job in waiting:
            job.pending._push("error", RuntimeError("the inference engine was closed"))
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _count(self, **deltas) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                self._stats[k] += v

    # --- the worker thread ---

    def _serve(self) -> None:
        while True:
            self._apply_unloads()
            jobs = self._next_batch()
            if jobs is None:
                return
            self._running = list(jobs)  # and every request that joins the batch
            try:
                self._run_batch(jobs)
            except Exception as e:  # one bad batch must not stop the server; its requests get the error
                log.exception("inference batch failed")
                self._count(failures=sum(not job.pending.finished for job in self._running))
                for job in self._running:
                    job.pending._push("error", e)  # a no-op for those already done

    def _next_batch(self) -> list[_Job] | None:
        with self._cond:
            while not self._waiting and not self._unloads and not self._closed:
                self._cond.wait()
            if self._closed:
                return None
            if not self._waiting:
                return []  # woken for an unload
            # Requests that arrive together (within the window) share the batch.
            deadline = time.monotonic() + self.batch_window_s
            while len(self._waiting) < self.max_batch_size and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            for job in [j for j in self._waiting if j.pending.cancelled]:
                self._waiting.remove(job)
                job.count(finished_cancelled=1)
                job.pending._push("done", Completion("", "cancelled", 0, 0, []))
            if not self._waiting:
                return []
            family, chosen, adapters = self._waiting[0].target.family, [], set()
            for job in self._waiting:
                if job.target.family != family or len(chosen) >= self.max_batch_size:
                    continue
                new_adapter = job.target.adapter is not None and job.target.adapter not in adapters
                if new_adapter and len(adapters) >= self.max_adapters:
                    continue
                chosen.append(job)
                adapters.add(job.target.adapter)
            for job in chosen:
                self._waiting.remove(job)
            return chosen

    def _apply_unloads(self) -> None:
        with self._cond:
            todo, self._unloads = self._unloads, []
        for target, done in todo:
            family = self._families.get(target.family)
            if family is not None and target.adapter is None:
                with self._state_lock:
                    del self._families[target.family]
            elif family is not None and target.adapter in family.adapters:
                self._drop_adapter(family, target.adapter)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            done.set()

    def _drop_adapter(self, family: _Family, adapter_dir: str) -> None:
        with self._state_lock:
            name = family.adapters.pop(adapter_dir)
        if family.adapters:
            # peft warns when the adapter it calls active goes; rows name their adapters, so it is moot.
            warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
            family.peft.delete_adapter(name)
        else:  # peft cannot run with no adapter left: take its layers out, back to the plain base
            family.model, family.peft = family.peft.unload(), None

    def _run_batch(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        family = self._family(jobs[0].target.family)
        rows = self._prepare(family, jobs, {job.target.adapter for job in jobs})
        if not rows:
            return
        self._count(batches=1)
        self._note_batch(len(rows))
        from hone.train.device import autocast

        with torch.inference_mode(), autocast(self.device, self.bf16):
            decode_batch(family.runner(), rows, pad_id=pad_token_id(family.tokenizer), device=self.device,
                         use_names=family.peft is not None, admit=lambda live: self._admit(family, live))

    def _prepare(self, family: _Family, jobs: list[_Job], in_use: set) -> list[_Row]:
        """Rows for jobs on this family (adapters attached as needed); a job that cannot run gets its error."""
        rows = []
        for job in jobs:
            try:
                name = self._adapter(family, job.target.adapter, in_use) if job.target.adapter else BASE
                row = self._row(family, job)
            except (RequestError, ModelError, OSError, ValueError) as e:
                self._count(failures=1)
                job.pending._push("error", e)
                continue
            row.name = name
            job.pending._push("start", len(row.prompt_ids))
            rows.append(row)
        self._count(rows=len(rows))
        return rows

    def _admit(self, family: _Family, live: list[_Row]) -> list[_Row]:
        """Waiting requests that may join the running batch: same model, free rows, the adapter limit kept.
        Not when another model's request is the oldest waiting (it goes next), and not a first adapter
        while the batch runs on the plain model (the base becomes a peft model only between batches)."""
        free = self.max_batch_size - len(live)
        with self._cond:
            if free <= 0 or not self._waiting or self._waiting[0].target.family != family.key:
                return []
            adapters = {r.adapter for r in live}
            chosen = []
            for job in self._waiting:
                a = job.target.adapter
                if job.target.family != family.key or len(chosen) >= free or job.pending.cancelled:
                    continue
                if a is not None and (family.peft is None or (
                        a not in adapters and len(adapters - {None}) >= self.max_adapters)):
                    continue
                chosen.append(job)
                adapters.add(a)
            for job in chosen:
                self._waiting.remove(job)
        self._running.extend(chosen)
        rows = self._prepare(family, chosen, adapters) if chosen else []
        self._note_batch(len(live) + len(rows))
        self._count(joined=len(rows))
        return rows

    def _note_batch(self, size: int) -> None:
        with self._stats_lock:
            self._stats["max_batch"] = max(self._stats["max_batch"], size)

    def _row(self, family: _Family, job: _Job) -> _Row:
        from hone.data.template import ensure_chat_template, render_prompt
        from hone.records import Message

        req, tok = job.request, family.tokenizer
        param = "messages" if req.messages is not None else "prompt"
        if req.messages is not None:
            ensure_chat_template(tok)
            ids = render_prompt(tok, [Message(m["role"], m["content"]) for m in req.messages])
        else:
            ids = tok(req.prompt)["input_ids"]
        if not ids:  # an empty completion prompt starts from the document boundary, as OpenAI's does
            ids = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
        room = context_length(family.model) - len(ids)
        if room < 1:
            raise RequestError(f"the prompt is {len(ids)} tokens; this model's context holds "
                               f"{context_length(family.model)}", param=param, code="context_length_exceeded")
        if req.max_tokens is not None and req.max_tokens > room:
            raise RequestError(f"max_tokens {req.max_tokens} does not fit: the prompt is {len(ids)} tokens and "
                               f"this model's context holds {context_length(family.model)}", param="max_tokens",
                               code="context_length_exceeded")
        max_new = req.max_tokens if req.max_tokens is not None else min(self.default_max_tokens, room)
        return _Row(job, ids, max_new, family.stop_ids, tok)

    def _family(self, key: str) -> _Family:
        family = self._families.get(key)
        if family is not None:
            with self._state_lock:
                self._families.move_to_end(key)
            return family
        while len(self._families) >= self.max_models:  # make room first: two bases may not fit together
            with self._state_lock:
                _, old = self._families.popitem(last=False)
            log.info("unloading %s (least recently used)", old.key)
            self._count(model_evictions=1)
            del old
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        loaded = self.loader(key)
        loaded.model.to(self.device).eval()
        family = _Family(key, loaded)
        with self._state_lock:
            self._families[key] = family
        self._count(model_loads=1)
        return family

    def _adapter(self, family: _Family, adapter_dir: str, in_use: set) -> str:
        name = family.adapters.get(adapter_dir)
        if name is not None:
            with self._state_lock:
                family.adapters.move_to_end(adapter_dir)
            return name
        name = "a" + hashlib.sha1(adapter_dir.encode()).hexdigest()[:16]  # peft names may not hold dots
        if family.peft is None:
            from peft import PeftModel

            family.peft = PeftModel.from_pretrained(family.model, adapter_dir, adapter_name=name,
                                                    is_trainable=False)
        else:
            family.peft.load_adapter(adapter_dir, adapter_name=name, is_trainable=False)
        family.peft.to(self.device).eval()
        with self._state_lock:
            family.adapters[adapter_dir] = name
        self._count(adapter_loads=1)
        for old_dir in list(family.adapters):  # least recently used first; never one this batch needs
            if len(family.adapters) <= self.max_adapters:
                break
            if old_dir not in in_use:
                self._drop_adapter(family, old_dir)
                self._count(adapter_evictions=1)
        return name


def pad_token_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else pad  # any id works: padded positions are masked out


def check_request(req: GenerationRequest) -> None:
    """Refuse bad parameters before the request queues, naming the field."""
    if (req.prompt is None) == (req.messages is None):
        raise RequestError("give either a prompt or messages", param="messages" if req.prompt is None else "prompt")
    if req.messages is not None:
        if not req.messages:
            raise RequestError("messages is empty", param="messages")
        for i, m in enumerate(req.messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(
                    m.get("content"), str):
                raise RequestError(f"messages[{i}] needs a string role and string content", param=f"messages[{i}]")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise RequestError("max_tokens must be at least 1", param="max_tokens")
    if not 0 <= req.temperature <= 2:
        raise RequestError("temperature must be between 0 and 2", param="temperature")
    if not 0 <= req.top_p <= 1:
        raise RequestError("top_p must be between 0 and 1", param="top_p")
    if len(req.stop) > 4 or any(not isinstance(s, str) or not s for s in req.stop):
        raise RequestError("stop takes up to 4 non-empty strings", param="stop")
