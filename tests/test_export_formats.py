"""`hone export` on a tiny trained LoRA run: every format reloads with its ecosystem's loader and passes the
parity check; a corrupted chat template or EOS id in an export makes the check fail (exit code 4)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import toy_rows, write_jsonl
from hone.config import parse_config
from hone.export import EXIT_PARITY_FAILED, ExportError, export_run
from hone.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def train_tiny_run(root: Path, model_dir: Path, **top) -> Path:
    """A tiny run on the keyword-routing toy task; 20 steps teach it to answer a label and stop."""
    train, test = write_jsonl(root / "train.jsonl", toy_rows(90, 1)), write_jsonl(root / "test.jsonl", toy_rows(30, 2))
    cfg = {"name": "tiny-run", "output_dir": str(root / "runs"), "model": {"base": str(model_dir)},
           "data": {"train": str(train), "validation": str(test), "max_seq_len": 256},
           "train": {"max_steps": 20, "learning_rate": 3e-3, "batch_tokens": 512, "log_every": 5, "save_every": 100,
                     "eval_every": 100, "warmup_ratio": 0.0, "threads": 1},
           "eval": {"max_new_tokens": 4, "enabled": False}, **top}
    return run_training(parse_config(cfg), show_progress=False).run_dir


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory, one_torch_thread) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("lora"), tiny_model_dir)


@pytest.fixture(scope="module")
def exports(lora_run, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("exports")
    specs = {"hf": ("hf", None), "peft": ("peft", None), "f16": ("gguf", "f16"), "q8_0": ("gguf", "q8_0"),
             "ollama": ("ollama", "q8_0")}
    return {key: (root / key, export_run(lora_run, fmt, quant=q, out=root / key, max_new_tokens=12))
            for key, (fmt, q) in specs.items()}


@pytest.mark.parametrize("key", ["hf", "peft", "f16", "q8_0", "ollama"])
def test_every_format_passes_parity(exports, key):
    out, parity = exports[key]
    assert parity["passed"], parity["failures"]
    assert json.loads((out / "parity.json").read_text())["passed"]
    # the run's held-out prompts are in the set, and the tuned model stops on them: the stop check is not vacuous
    assert parity["prompts"] >= 8 and parity["stop"]["reference_stopped"] >= 4
    assert parity["stop"]["export_stopped_same"] == parity["stop"]["reference_stopped"] or key in ("f16", "q8_0",
                                                                                                  "ollama")
    assert parity["stop"]["end_of_turn"] == "<|im_end|>" and parity["stop"]["end_of_turn_id"] in \
        parity["stop"]["export_stop_ids"]


def test_lossless_formats_match_tightly(exports):
    for key in ("hf", "peft"):
        p = exports[key][1]
        assert p["logits"]["max_rel_diff"] < 1e-5 and p["generation"]["identical"] == p["generation"]["of"]
    assert exports["peft"][1]["logits"]["max_abs_diff"] == 0.0  # the same adapter over the same base
    # quantised GGUF: measured and bounded, and coarser types drift more
    f16, q8 = exports["f16"][1]["logits"]["max_rel_diff"], exports["q8_0"][1]["logits"]["max_rel_diff"]
    assert 0 < f16 < q8 < 0.05


def test_hf_export_is_a_plain_transformers_dir(exports):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exports["hf"][0]
    assert (out / "model.safetensors").is_file() and not list(out.glob("adapter_*"))
    gen = json.loads((out / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert "<|im_start|>" in tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(model, "peft_config") and "lora" not in str(list(model.state_dict()))


def test_peft_export_names_its_base(exports, tiny_model_dir):
    out = exports["peft"][0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert (out / "adapter_model.safetensors").is_file() and (out / "generation_config.json").is_file()


def test_gguf_metadata(exports):
    import gguf

    out = exports["q8_0"][0]
    (path,) = out.glob("*.gguf")
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2  # <|im_end|>
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    assert int(fields["general.file_type"].contents()) == gguf.LlamaFileType.MOSTLY_Q8_0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert path.stat().st_size < (exports["f16"][0] / path.name.replace("q8_0", "f16")).stat().st_size


def test_ollama_modelfile(exports):
    out, parity = exports["ollama"]
    text = (out / "Modelfile").read_text()
    assert text.startswith("FROM ./tiny-run-q8_0.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert "{{ .Content }}<|im_end|>" in text
    # the run trained with a system instruction (text+label data), so the Modelfile carries it
    assert 'SYSTEM """Classify the customer message' in text
    assert parity["ollama_template"]["identical"] == parity["ollama_template"]["of"]


def test_model_card(exports):
    card = (exports["hf"][0] / "README.md").read_text()
    for needle in ("base_model:", "license: unknown", "## Data lineage", "sha256", "## Parity with the trained "
                   "model", "**PASSED**", "LoRA: r=16", "## Intended use"):
        assert needle in card, needle


# --- corruption must be caught ---------------------------------------------------------------------------


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_corrupted_template_fails_hf(lora_run, exports, tmp_path):
    out = _copy(exports["hf"][0], tmp_path)
    jinja = out / "chat_template.jinja"
    original = jinja.read_text()
    jinja.write_text(original.replace("<|im_start|>", "<|im_start|> "))  # one stray space per turn header
    assert jinja.read_text() != original
    parity = export_run(lora_run, "hf", out=out, check_only=True, max_new_tokens=12)
    assert not parity["passed"]
    assert any(f.startswith("chat template:") for f in parity["failures"]), parity["failures"]


def test_corrupted_eos_fails_hf(lora_run, exports, tmp_path):
    out = _copy(exports["hf"][0], tmp_path)
    path = out / "generation_config.json"
    gen = json.loads(path.read_text())
    gen["eos_token_id"] = 0  # <|endoftext|>: the model never says it, so answers would not stop
    path.write_text(json.dumps(gen))
    parity = export_run(lora_run, "hf", out=out, check_only=True, max_new_tokens=12)
    assert not parity["passed"]
    assert any(f.startswith("stop:") for f in parity["failures"]), parity["failures"]
    assert parity["generation"]["identical"] < parity["generation"]["of"]  # the answers really ran on


def _edit_gguf(out: Path, *args: str) -> None:
    """Rewrite the export's GGUF with gguf-py's own metadata editor."""
    (path,) = out.glob("*.gguf")
    edited = path.with_suffix(".edited")
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(path), str(edited), "--force", *args],
                   check=True, capture_output=True)
    edited.replace(path)


def test_corrupted_eos_fails_gguf(lora_run, exports, tmp_path):
    out = _copy(exports["q8_0"][0], tmp_path)
    _edit_gguf(out, "--special-token-by-id", "eos", "0")
    parity = export_run(lora_run, "gguf", out=out, check_only=True, max_new_tokens=12)
    assert parity["quant"] == "q8_0"
    assert not parity["passed"] and any(f.startswith("stop:") for f in parity["failures"]), parity["failures"]


def test_corrupted_template_fails_gguf(lora_run, exports, tmp_path):
    out = _copy(exports["q8_0"][0], tmp_path)
    changed = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
    _edit_gguf(out, "--chat-template", changed)
    parity = export_run(lora_run, "gguf", out=out, check_only=True, max_new_tokens=12)
    assert not parity["passed"] and any(f.startswith("chat template:") for f in parity["failures"])


def test_corrupted_modelfile_fails_ollama(lora_run, exports, tmp_path):
    out = _copy(exports["ollama"][0], tmp_path)
    modelfile = out / "Modelfile"
    modelfile.write_text(modelfile.read_text().replace('PARAMETER stop "<|im_end|>"\n', ""))
    parity = export_run(lora_run, "ollama", out=out, check_only=True, max_new_tokens=12)
    assert not parity["passed"] and any("PARAMETER stop" in f for f in parity["failures"]), parity["failures"]


# --- the command ---------------------------------------------------------------------------------------------


def test_cli_exit_codes(lora_run, exports, tmp_path):
    from hone.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["export", str(lora_run), "--format", "hf", "--out", str(tmp_path / "hf"),
                             "--max-new-tokens", "8"])
    assert ok.exit_code == 0, ok.output
    assert "parity passed" in ok.output
    out = _copy(exports["hf"][0], tmp_path / "bad")
    (out / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    bad = runner.invoke(app, ["export", str(lora_run), "--format", "hf", "--out", str(out), "--check-only",
                              "--max-new-tokens", "8"])
    assert bad.exit_code == EXIT_PARITY_FAILED, bad.output
    assert "parity failed" in bad.output
    wrong = runner.invoke(app, ["export", str(lora_run), "--format", "gguf", "--quant", "q3_k"])
    assert wrong.exit_code == 2 and "q8_0" in wrong.output


def test_bad_requests_fail_before_loading(lora_run, tmp_path):
    with pytest.raises(ExportError, match="choose one of"):
        export_run(lora_run, "onnx")
    with pytest.raises(ExportError, match="--quant applies"):
        export_run(lora_run, "hf", quant="q8_0")
    with pytest.raises(ExportError, match="not a finished hone run"):
        export_run(tmp_path, "hf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_run(lora_run, "hf", out=tmp_path / "taken")
