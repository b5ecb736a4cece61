"""The inference engine on the tiny model: several adapters over one loaded base, batched, streamed.

The reference for every greedy check is transformers' own generate() on the model loaded alone by
load_model (a run directory loads its adapter over a fresh base), one prompt at a time, unpadded.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
import yaml

from hone.data.template import ensure_chat_template, render_prompt
from hone.models.load import ModelError, load_model, save_hf_dir
from hone.records import Message
from hone.serve.decode import IncrementalText, held_stop_prefix, top_p_filter
from hone.serve.engine import Completion, GenerationRequest, InferenceEngine, RequestError, resolve_target

CHAT = [{"role": "user", "content": "Where is my package?"}]
CHAT_LONG = [{"role": "system", "content": "You are a support agent."},
             {"role": "user", "content": "I was charged twice for the same invoice, please fix the billing."}]


def write_run(run: Path, base: Path) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"model": {"base": str(base)}}))
    return run


def lora_run(run: Path, base: Path, seed: int) -> str:
    """A run directory whose final/ is a LoRA adapter with random (non-zero) weights."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = load_model(str(base)).model
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  init_lora_weights=False))
    with torch.no_grad():  # large enough that each adapter's greedy answers differ from the base's
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.mul_(3.0)
    peft_model.save_pretrained(write_run(run, base) / "final")
    return str(run)


def full_run(run: Path, base: Path) -> str:
    """A run directory whose final/ holds full weights (the base's, perturbed)."""
    loaded = load_model(str(base))
    torch.manual_seed(7)
    with torch.no_grad():
        for p in loaded.model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    save_hf_dir(loaded.model, loaded.tokenizer, write_run(run, base) / "final")
    return str(run)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return {"base": str(tiny_model_dir), "A": lora_run(root / "run-a", tiny_model_dir, 1),
            "B": lora_run(root / "run-b", tiny_model_dir, 2), "full": full_run(root / "run-full", tiny_model_dir)}


_alone_cache: dict = {}


def alone(key: str, messages=None, prompt=None, max_new: int = 10) -> list[int]:
    """Greedy tokens from generate() on the model loaded alone, for one unpadded prompt."""
    if key not in _alone_cache:
        _alone_cache[key] = load_model(key)
    loaded = _alone_cache[key]
    tok = loaded.tokenizer
    ensure_chat_template(tok)
    ids = render_prompt(tok, [Message(**m) for m in messages]) if messages else tok(prompt)["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id,
                                    pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


class CountingLoader:
    def __init__(self):
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, key):
        with self.lock:
            self.calls.append(key)
        return load_model(key)


def greedy(model, *, messages=None, prompt=None, max_tokens=10, **kw) -> GenerationRequest:
    return GenerationRequest(model=model, messages=messages, prompt=prompt, max_tokens=max_tokens, **kw)


def test_mixed_batch_matches_each_model_loaded_alone(models, one_torch_thread):
    loader = CountingLoader()
    engine = InferenceEngine(loader=loader, start=False)
    requests = [greedy(models["A"], messages=CHAT), greedy(models["B"], messages=CHAT),
                greedy(models["base"], messages=CHAT), greedy(models["A"], messages=CHAT_LONG),
                greedy(models["B"], prompt="hello team quick question"), greedy(models["base"], messages=CHAT_LONG)]
    pending = [engine.submit(r) for r in requests]
    engine.start()  # everything is queued: one batch mixes both adapters and the plain base
    results = [p.result(60) for p in pending]
    engine.close()

    for req, res in zip(requests, results):
        assert res.token_ids == alone(req.model, req.messages, req.prompt), req
        assert res.prompt_tokens > 0 and res.completion_tokens == len(res.token_ids)
    # The adapters really change the answers, so the equalities above could have failed.
    assert len({tuple(results[i].token_ids) for i in range(3)}) == 3
    stats = engine.stats()
    assert stats["batches"] == 1 and stats["max_batch"] == len(requests)
    assert loader.calls == [str(Path(models["base"]).resolve())]  # the base's weights loaded once
    assert stats["adapter_loads"] == 2


def test_sequential_and_concurrent_requests_load_the_base_once(models, one_torch_thread):
    loader = CountingLoader()
    with InferenceEngine(loader=loader, batch_window_s=0.005) as engine:
        for key in ("A", "base", "B", "A", "base"):
            assert engine.generate(greedy(models[key], messages=CHAT), timeout=60).token_ids == alone(
                models[key], CHAT)
        results: dict[int, Completion] = {}

        def ask(i):
            results[i] = engine.generate(greedy(models["AB"[i % 2]], messages=CHAT_LONG), timeout=60)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for i, res in results.items():
        assert res.token_ids == alone(models["AB"[i % 2]], CHAT_LONG)
    assert len(loader.calls) == 1 and engine.stats()["adapter_loads"] == 2


def test_full_weight_run_loads_as_its_own_model(models, one_torch_thread):
    loader = CountingLoader()
    with InferenceEngine(loader=loader) as engine:
        full = engine.generate(greedy(models["full"], messages=CHAT), timeout=60)
        base = engine.generate(greedy(models["base"], messages=CHAT), timeout=60)
    assert full.token_ids == alone(models["full"], CHAT) != base.token_ids
    assert sorted(loader.calls) == sorted(str(Path(models[k]).resolve()) for k in ("full", "base"))


def test_lru_limits_unload_and_reload(models, one_torch_thread):
    loader = CountingLoader()
    with InferenceEngine(loader=loader, max_models=1, max_adapters=1) as engine:
        for key in ("base", "full", "base"):
            assert engine.generate(greedy(models[key], messages=CHAT), timeout=60).token_ids == alone(
                models[key], CHAT)
        for key in ("A", "B", "A"):
            assert engine.generate(greedy(models[key], messages=CHAT), timeout=60).token_ids == alone(
                models[key], CHAT)
        stats = engine.stats()
    assert len(loader.calls) == 3 and stats["model_evictions"] == 2
    assert stats["adapter_loads"] == 3 and stats["adapter_evictions"] == 2


def test_streamed_pieces_concatenate_to_the_text(models, one_torch_thread):
    with InferenceEngine() as engine:
        whole = engine.generate(greedy(models["A"], messages=CHAT_LONG, max_tokens=24), timeout=60)
        pending = engine.submit(greedy(models["A"], messages=CHAT_LONG, max_tokens=24))
        pieces = list(pending.stream(timeout=60))
        streamed = pending.result()
    assert len(pieces) > 1 and "".join(pieces) == whole.text == streamed.text
    assert streamed.token_ids == whole.token_ids


def test_incremental_text_holds_back_split_characters(tiny):
    _, tok = tiny
    text = "café 日本 ok ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tok)
    pieces = [inc.add(i)[0] for i in ids] + [inc.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) < len(ids)  # multi-byte characters arrive over several tokens


def test_stop_string_ends_the_text_and_never_streams(models, one_torch_thread):
    with InferenceEngine() as engine:
        free = engine.generate(greedy(models["B"], messages=CHAT, max_tokens=12), timeout=60).text
        stop = free[4:6]
        assert stop and free.find(stop) >= 0
        pending = engine.submit(greedy(models["B"], messages=CHAT, max_tokens=12, stop=[stop, "zzzz"]))
        pieces = list(pending.stream(timeout=60))
        res = pending.result()
    assert res.text == free[:free.find(stop)] == "".join(pieces)
    assert res.finish_reason == "stop" and not any(stop in p for p in pieces)


def test_held_stop_prefix():
    assert held_stop_prefix("abc<|e", ["<|end|>"]) == 3
    assert held_stop_prefix("abc", ["<|end|>", "c"]) == 0  # a whole stop string is found, not held
    assert held_stop_prefix("xaa", ["aab"]) == 2


def test_eos_finishes_with_stop_and_counts_the_token(models, one_torch_thread):
    with InferenceEngine() as engine:
        res = engine.generate(greedy(models["A"], messages=CHAT, max_tokens=12), timeout=60)
        assert res.finish_reason == "length" and res.completion_tokens == 12
        # Make the first greedy token the end-of-turn token: the answer is then empty and 'stop'.
        engine._families[next(iter(engine._families))].stop_ids.add(res.token_ids[0])
        res = engine.generate(greedy(models["A"], messages=CHAT, max_tokens=12), timeout=60)
    assert (res.text, res.finish_reason, res.completion_tokens) == ("", "stop", 1)


def test_sampling_seed_is_reproducible_alone_and_batched(models, one_torch_thread):
    def sample(seed):
        return GenerationRequest(model=models["A"], messages=CHAT, max_tokens=10, temperature=1.5, top_p=0.95,
                                 seed=seed)

    with InferenceEngine(start=False) as engine:
        first = engine.submit(sample(11))
        others = [engine.submit(sample(s)) for s in (12, 13, 14)]
        batched_same = engine.submit(sample(11))
        engine.start()
        a, b = first.result(60), batched_same.result(60)
        alone_same = engine.generate(sample(11), timeout=60)
        different = [p.result(60).token_ids for p in others]
    assert a.token_ids == b.token_ids == alone_same.token_ids
    assert any(d != a.token_ids for d in different)


def test_top_p_filter_by_hand():
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert top_p_filter(probs, 0.6).tolist() == pytest.approx([0.0, 0.5, 0.3])
    assert top_p_filter(probs, 0.5).tolist() == pytest.approx([0.0, 0.5, 0.0])
    assert top_p_filter(probs, 0.0).tolist() == pytest.approx([0.0, 0.5, 0.0])
    assert top_p_filter(probs, 1.0).tolist() == pytest.approx([0.2, 0.5, 0.3])


def test_bad_requests_are_refused_naming_the_field(models, tmp_path, one_torch_thread):
    with InferenceEngine() as engine:
        for kw, param in [({"temperature": 3.0}, "temperature"), ({"top_p": 1.5}, "top_p"),
                          ({"max_tokens": 0}, "max_tokens"), ({"stop": ["a"] * 5}, "stop")]:
            with pytest.raises(RequestError) as e:
                engine.submit(greedy(models["A"], messages=CHAT, **kw))
            assert e.value.param == param
        with pytest.raises(RequestError, match="messages is empty"):
            engine.submit(greedy(models["A"], messages=[]))
        with pytest.raises(RequestError) as e:
            engine.generate(greedy(models["A"], prompt="hello " * 3000), timeout=60)
        assert e.value.code == "context_length_exceeded" and e.value.param == "prompt"
        with pytest.raises(ModelError):
            engine.generate(greedy(str(tmp_path / "no-such-model"), messages=CHAT), timeout=60)
        # The engine goes on serving after failures.
        assert engine.generate(greedy(models["A"], messages=CHAT), timeout=60).token_ids == alone(models["A"], CHAT)


def test_cancel_stops_generation(models, one_torch_thread):
    with InferenceEngine() as engine:
        pending = engine.submit(greedy(models["base"], messages=CHAT, max_tokens=500))
        for _ in pending.stream(timeout=60):
            pending.cancel()
        res = pending.result()
    assert res.finish_reason == "cancelled" and res.completion_tokens < 500


def test_resolve_target(models, tmp_path):
    base = str(Path(models["base"]).resolve())
    assert resolve_target(models["A"]) == resolve_target(models["A"])
    assert resolve_target(models["A"]).family == base and resolve_target(models["A"]).adapter.endswith("final")
    assert resolve_target(models["full"]).adapter is None
    bare = resolve_target(models["A"] + "/final")  # a bare peft directory: its config names the base
    assert bare.family == base and bare.adapter == resolve_target(models["A"]).adapter
    assert resolve_target("smollm2-135m-instruct").family == "smollm2-135m-instruct"


def test_a_trained_run_serves_over_the_shared_base(tiny_config, tiny_model_dir, one_torch_thread):
    from hone.config import parse_config
    from hone.train.run import run_training

    tiny_config["train"]["max_steps"] = 2
    run_dir = str(run_training(parse_config(tiny_config), show_progress=False).run_dir)
    loader = CountingLoader()
    with InferenceEngine(loader=loader, start=False) as engine:
        tuned = engine.submit(greedy(run_dir, messages=CHAT))
        base = engine.submit(greedy(str(tiny_model_dir), messages=CHAT))
        engine.start()
        assert tuned.result(60).token_ids == alone(run_dir, CHAT)
        assert base.result(60).token_ids == alone(str(tiny_model_dir), CHAT)
    assert len(loader.calls) == 1


def test_unload_drops_adapters_and_models_even_after_their_files_go(models, tmp_path, tiny_model_dir,
                                                                    one_torch_thread):
    import shutil

    doomed = str(shutil.copytree(models["A"], tmp_path / "doomed"))
    loader = CountingLoader()
    with InferenceEngine(loader=loader) as engine:
        for key in (doomed, models["B"], models["full"]):
            engine.generate(greedy(key, messages=CHAT), timeout=60)
        base = str(Path(models["base"]).resolve())
        assert engine.loaded() == {base: [str(Path(doomed, "final")), resolve_target(models["B"]).adapter],
                                   str(Path(models["full"]).resolve()): []}
        shutil.rmtree(doomed)  # the model was deleted: its weights must not stay in memory
        assert engine.unload(doomed) and engine.unload(models["full"])
        assert engine.loaded() == {base: [resolve_target(models["B"]).adapter]}
        assert engine.unload(models["B"]) and engine.loaded() == {base: []}  # back to the plain base
        for key in ("base", "A"):
            assert engine.generate(greedy(models[key], messages=CHAT), timeout=60).token_ids == alone(
                models[key], CHAT)
    assert len(loader.calls) == 2  # the base stayed loaded throughout; the full run loaded once


def test_requests_join_a_running_batch(models, one_torch_thread):
    """Continuous batching: requests that arrive while a batch decodes join it (B's adapter is attached
    mid-batch), and neither they nor the running row change a token."""
    with InferenceEngine(batch_window_s=0.0) as engine:
        long = engine.submit(greedy(models["A"], messages=CHAT_LONG, max_tokens=500))
        next(iter(long.stream(timeout=60)))  # it is decoding now
        late = [engine.submit(greedy(models[k], messages=CHAT)) for k in ("B", "base", "A")]
        results = [p.result(60) for p in late]
        assert not long.finished  # the joiners finished while the long row went on
        long_result = long.result(60)
        stats = engine.stats()
    assert stats["batches"] == 1 and stats["joined"] == 3 and stats["max_batch"] == 4
    for key, res in zip(("B", "base", "A"), results):
        assert res.token_ids == alone(models[key], CHAT)
    assert long_result.token_ids == alone(models["A"], CHAT_LONG, max_new=500)
