"""Exports of other kinds of runs: full weights, DoRA and IA3 (merged), prefix tuning (adapter only), and the
embedded model (slow). Plus the pieces the formats are built from: end-of-turn detection, the GGUF layout,
the Ollama template check, the prompt file reader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hone.export import ExportError, export_run
from hone.export.chat import end_of_turn_token, stop_ids
from hone.export.gguf import _permute, check_exportable
from hone.export.ollama import CHATML_GO_TEMPLATE, check_chatml, modelfile, parse_modelfile
from hone.export.parity import load_prompts
from hone.models.tiny import build_tokenizer
from test_export_formats import train_tiny_run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("method", ["full", "dora", "ia3"])
def test_merged_exports_pass(method, tiny_model_dir, tmp_path):
    run = train_tiny_run(tmp_path, tiny_model_dir, method=method, train={
        "max_steps": 8, "learning_rate": 3e-3, "batch_tokens": 512, "warmup_ratio": 0.0, "threads": 1,
        "save_every": 100, "eval_every": 100})
    parity = export_run(run, "hf", out=tmp_path / "hf", max_new_tokens=8)
    assert parity["passed"], parity["failures"]
    assert parity["logits"]["max_rel_diff"] < 1e-5
    if method == "full":
        with pytest.raises(ExportError, match="no adapter"):
            export_run(run, "peft")


def test_prefix_adapter_exports_as_peft_only(tiny_model_dir, tmp_path):
    run = train_tiny_run(tmp_path, tiny_model_dir, method="prefix", train={
        "max_steps": 4, "learning_rate": 3e-1, "batch_tokens": 512, "warmup_ratio": 0.0, "threads": 1,
        "save_every": 100, "eval_every": 100})
    for fmt in ("hf", "gguf", "ollama"):
        with pytest.raises(ExportError, match="--format peft"):
            export_run(run, fmt)
    parity = export_run(run, "peft", out=tmp_path / "peft", max_new_tokens=8)
    assert parity["passed"], parity["failures"]
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"


# --- pieces ----------------------------------------------------------------------------------------------------


def test_end_of_turn_is_read_from_the_template():
    tok = build_tokenizer()
    assert end_of_turn_token(tok) == "<|im_end|>"
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]})
    tok.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                         "{{ m['content'] }}<|eot_id|>{% endfor %}"
                         "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    assert end_of_turn_token(tok) == "<|eot_id|>"
    # the end-of-turn token first, then the tokenizer's EOS
    assert stop_ids(tok) == [tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id]
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    assert end_of_turn_token(tok) is None and stop_ids(tok) == [tok.eos_token_id]


def test_permute_is_what_transformers_gguf_reader_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    rng = np.random.default_rng(0)
    for heads, kv in ((4, 4), (4, 2)):
        w = rng.standard_normal((kv * 16, 64)).astype(np.float32)
        back = LlamaTensorProcessor({"num_attention_heads": heads, "num_key_value_heads": kv})._reverse_permute_weights(
            _permute(w, heads, kv), heads, kv)
        assert np.array_equal(back, w) and not np.array_equal(_permute(w, heads, kv), w)


def test_gguf_refuses_other_architectures():
    from transformers import LlamaConfig, Qwen2Config

    with pytest.raises(ExportError, match="Llama-architecture.*'qwen2'"):
        check_exportable(Qwen2Config())
    scaled = LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    with pytest.raises(ExportError, match="rope scaling"):
        check_exportable(scaled)
    check_exportable(LlamaConfig())


def test_ollama_translates_only_chatml():
    tok = build_tokenizer()
    assert check_chatml(tok) is None  # ChatML without a default system prompt
    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok.chat_template = smol
    text = modelfile(tok, [2], "m.gguf")
    parsed = parse_modelfile(text)
    assert parsed == {"from": "./m.gguf", "template": CHATML_GO_TEMPLATE, "system": "You are helpful.",
                      "stops": ["<|im_end|>"]}
    assert parse_modelfile(modelfile(tok, [2], "m.gguf", system="Route tickets."))["system"] == "Route tickets."
    tok.chat_template = smol.replace("message['role'] + '\n'", "message['role'] + ': '")
    with pytest.raises(ExportError, match="not ChatML-style"):
        modelfile(tok, [2], "m.gguf")


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond\n")
    assert [[m.content for m in p] for p in load_prompts(txt)] == [["first"], ["second"]]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                           {"role": "assistant", "content": "a"}]}) + "\n"
                  + json.dumps({"prompt": "plain"}) + "\n")
    assert [[(m.role, m.content) for m in p] for p in load_prompts(jl)] == [[("system", "s"), ("user", "u")],
                                                                          [("user", "plain")]]
    jl.write_text('{"text": 1}\n')
    with pytest.raises(ExportError, match=r"p.jsonl:1"):
        load_prompts(jl)


@pytest.mark.slow
def test_embedded_model_gguf_q8_0(tmp_path):
    """The embedded SmolLM2 through a short LoRA run, exported to q8_0 GGUF: parity holds on the real model."""
    from hone.config import parse_config
    from hone.train.run import run_training

    demo = __import__("hone").__path__[0] + "/demo_data"
    cfg = parse_config({"name": "smol", "output_dir": str(tmp_path), "data": {
        "train": f"{demo}/tickets_train.jsonl", "validation": f"{demo}/tickets_test.jsonl", "max_validation": 8},
        "train": {"max_steps": 4, "threads": 2}, "eval": {"enabled": False}})
    run = run_training(cfg, show_progress=False).run_dir
    parity = export_run(run, "gguf", quant="q8_0", out=tmp_path / "q8", max_new_tokens=16)
    assert parity["passed"], parity["failures"]
