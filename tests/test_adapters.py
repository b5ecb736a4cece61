"""QLoRA, prefix tuning and prompt tuning on the tiny model: each trains only its own parameters and lowers the
loss, saves final/, reloads from the run directory to the same model, and resumes; prefix and prompt tuning's
virtual tokens reach both the training loss (packed rows included) and generation; QLoRA says clearly why it
cannot run where bitsandbytes is missing or unsupported, before any model loads."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from hone.config import parse_config
from hone.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _qlora_problem() -> str | None:
    from hone.models.adapters import bitsandbytes_problem

    return bitsandbytes_problem(torch.device("cpu"))


QLORA_PROBLEM = _qlora_problem()  # the check hone itself runs: bitsandbytes importable and working here
needs_bnb = pytest.mark.skipif(QLORA_PROBLEM is not None, reason=f"qlora cannot run here: {QLORA_PROBLEM}")
# Learning rates that move each adapter visibly in a dozen steps on the tiny model (prompt-learning adapters
# need far larger steps than LoRA: their few parameters sit before the whole network).
SETTINGS = {"qlora": {"learning_rate": 3e-3}, "prefix": {"learning_rate": 3e-1}, "prompt": {"learning_rate": 3e-1}}
METHODS = [pytest.param("qlora", marks=needs_bnb), "prefix", "prompt"]


def adapter_config(tiny_config, method: str, **train) -> dict:
    cfg = dict(tiny_config, method=method, virtual_tokens={"num_virtual_tokens": 8})
    cfg["train"] = {**tiny_config["train"], "max_steps": 12, **SETTINGS[method], **train}
    return cfg


def run(cfg_dict, **kw):
    return run_training(parse_config(cfg_dict), show_progress=False, **kw)


def prepared(cfg_dict, tmp_path):
    """(cfg, base model, tokenizer, SFT task) for driving the pieces directly."""
    from hone.methods import sft
    from hone.models.adapters import load_quantized
    from hone.models.load import load_model
    from hone.train.runlog import RunLog

    cfg = parse_config(cfg_dict)
    loaded = load_quantized(cfg) if cfg.weights == "qlora" else load_model(cfg.model.base)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    task = sft.build(cfg, sft.validate(cfg), loaded.model, loaded.tokenizer, work, RunLog(work))
    return cfg, loaded.model, loaded.tokenizer, task


def held_out_loss(model, task) -> float:
    from hone.train.loop import evaluate_loss

    return evaluate_loss(model, task, torch.device("cpu"), False)[0]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


# ---- the loss path: virtual tokens take part, packed rows stay apart -----------------------------------------


def packed_examples(tok):
    from hone.data.pack import collate_rows
    from hone.data.template import render_with_loss_mask
    from hone.records import Conversation, Message

    convs = [Conversation([Message("user", "I was charged twice"), Message("assistant", "billing")]),
             Conversation([Message("user", "where is my package?"), Message("assistant", "shipping")]),
             Conversation([Message("user", "Please reset my password"), Message("assistant", "login")])]
    examples = [render_with_loss_mask(tok, c) for c in convs]
    examples[1].weights = [w * 0.5 for w in examples[1].weights]  # weighting is exercised too
    width = len(examples[0].input_ids) + len(examples[1].input_ids) + 5  # a padding tail in row 0
    return examples, collate_rows(examples, [[0, 1], [2]], width, tok.pad_token_id)


def prompt_model(base, method: str):
    from hone.models.adapters import apply_weights
    from hone.models.load import load_model

    cfg = parse_config({"method": method, "model": {"base": str(base)}, "data": {"train": "x.jsonl"},
                        "virtual_tokens": {"num_virtual_tokens": 5}})
    loaded = load_model(str(base))
    torch.manual_seed(0)
    model = apply_weights(loaded.model, cfg)
    with torch.no_grad():  # far from their starting values, so a forgotten virtual token would show
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    return model.eval(), loaded.tokenizer


def standalone_loss_sum(model, examples) -> torch.Tensor:
    """Each example alone through peft's own forward with full logits: what packed rows must reproduce."""
    total = 0.0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        logits = model(input_ids=ids).logits[0]
        logits = logits[logits.shape[0] - ids.shape[1]:]  # prompt tuning returns its virtual tokens first
        ce = F.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="none")
        total = total + (ce * torch.tensor(ex.weights[1:])).sum()
    return total


def check_packed_loss_equals_each_example_alone(model, tok, rtol=1e-5):
    from hone.methods.sft import sft_loss_sum

    examples, batch = packed_examples(tok)
    packed = sft_loss_sum(model, batch)
    alone = standalone_loss_sum(model, examples)
    torch.testing.assert_close(packed, alone, rtol=rtol, atol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(packed, params), torch.autograd.grad(alone, params)):
        torch.testing.assert_close(a, b, rtol=100 * rtol, atol=1e-6)
    with model.disable_adapter():  # the same rows without virtual tokens: a different loss
        assert abs(sft_loss_sum(model, batch).item() - packed.item()) > 0.1


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_packed_loss_equals_each_example_alone_through_peft(tiny_model_dir, method):
    check_packed_loss_equals_each_example_alone(*prompt_model(tiny_model_dir, method))


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_generation_sees_the_virtual_tokens_the_loss_saw(tiny_model_dir, method):
    check_generation_matches_the_loss_path(*prompt_model(tiny_model_dir, method))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_on_the_embedded_model(method):
    from hone.config import EMBEDDED_MODEL

    model, tok = prompt_model(EMBEDDED_MODEL, method)
    check_packed_loss_equals_each_example_alone(model, tok, rtol=1e-4)
    check_generation_matches_the_loss_path(model, tok)


def check_generation_matches_the_loss_path(model, tok):
    """The first generated token's scores equal the training path's logits at the prompt's last position."""
    from hone.data.pack import MicroBatch
    from hone.data.template import render_prompt
    from hone.methods.sft import hidden_states, unwrap
    from hone.records import Message

    prompt = render_prompt(tok, [Message("user", "where is my package?")])
    ids = torch.tensor([prompt])
    with torch.no_grad():
        scores = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                do_sample=False, output_scores=True, return_dict_in_generate=True,
                                pad_token_id=tok.pad_token_id).scores[0][0]
        batch = MicroBatch(ids, torch.arange(len(prompt))[None], torch.ones_like(ids), torch.ones(ids.shape),
                           len(prompt))
        logits = unwrap(model).get_output_embeddings()(hidden_states(model, batch)[0, -1])
        with model.disable_adapter():
            plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1,
                                   do_sample=False, output_scores=True, return_dict_in_generate=True,
                                   pad_token_id=tok.pad_token_id).scores[0][0]
    torch.testing.assert_close(scores, logits, rtol=1e-4, atol=1e-4)
    assert (plain - scores).abs().max() > 0.1


def test_prompt_init_text_sets_the_virtual_tokens(tiny_model_dir):
    from hone.models.adapters import apply_weights
    from hone.models.load import load_model

    loaded = load_model(str(tiny_model_dir))
    ids = loaded.tokenizer("billing or login", add_special_tokens=False)["input_ids"]
    n = len(ids) + 3  # the text's tokens, then its first three again
    cfg = parse_config({"method": "prompt", "model": {"base": str(tiny_model_dir)}, "data": {"train": "x.jsonl"},
                        "virtual_tokens": {"num_virtual_tokens": n, "init_text": "billing or login"}})
    want = loaded.model.get_input_embeddings().weight[ids + ids[:3]].detach().clone()
    model = apply_weights(loaded.model, cfg)
    got = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(got, want)
    assert got.requires_grad
    with pytest.raises(Exception, match="init_text"):
        parse_config({"data": {"train": "x.jsonl"}, "virtual_tokens": {"init_text": ""}})


def test_prefix_from_text_acts_as_that_text_before_the_input(tiny_model_dir):
    """At step 0 a prefix started from init_text gives the logits the base model gives with the text
    written in front of the input: keys and values land in peft's layout, at the right positions."""
    from hone.models.adapters import apply_weights
    from hone.models.load import load_model

    loaded = load_model(str(tiny_model_dir))
    text = loaded.tokenizer("billing or login", add_special_tokens=False)["input_ids"]
    cfg = parse_config({"method": "prefix", "model": {"base": str(tiny_model_dir)}, "data": {"train": "x.jsonl"},
                        "virtual_tokens": {"num_virtual_tokens": len(text), "init_text": "billing or login"}})
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        with_text = loaded.model(input_ids=torch.cat([torch.tensor([text]), ids], dim=1)).logits[:, len(text):]
        model = apply_weights(loaded.model, cfg)
        torch.testing.assert_close(model(input_ids=ids).logits, with_text, rtol=1e-5, atol=1e-5)
        with model.disable_adapter():
            assert (model(input_ids=ids).logits - with_text).abs().max() > 1e-2


# ---- training: own parameters move, frozen ones stay, the loss drops -----------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_trains_only_its_own_parameters_and_lowers_the_loss(tiny_config, tmp_path, method):
    from hone.models.adapters import apply_weights, count_params
    from hone.train.loop import train_loop
    from hone.train.runlog import RunLog

    cfg, base, _, task = prepared(adapter_config(tiny_config, method), tmp_path)
    base_params = count_params(base)[1]
    model = apply_weights(base, cfg)
    trainable, total = count_params(model)
    assert 0 < trainable < total / 2 and total >= base_params
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss_before = held_out_loss(model, task)
    train_loop(model, task, cfg, tmp_path, RunLog(tmp_path), show_progress=False)
    moved = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            moved.append(not torch.equal(p, before[n]))
        else:
            assert torch.equal(p, before[n]), f"frozen {n} changed"
    # LoRA's A matrices may stay put while B is zero-initialised; everything else must move.
    assert any(moved) and all(m or "lora_A" in n for m, n in zip(moved, [n for n, p in model.named_parameters()
                                                                       if p.requires_grad]))
    assert held_out_loss(model, task) < loss_before - 0.05


@needs_bnb
def test_qlora_base_is_4bit_nf4(tiny_config, tmp_path):
    import bitsandbytes as bnb

    from hone.models.adapters import apply_weights, count_params, quantize_in_place
    from hone.models.load import load_model

    cfg, base, _, _ = prepared(adapter_config(tiny_config, "qlora"), tmp_path)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of 2 layers; lm_head stays full precision
    assert all(m.weight.quant_type == "nf4" and m.weight.compress_statistics for m in layers)
    plain = load_model(str(cfg.model.base)).model
    assert count_params(base)[1] == count_params(plain)[1]  # 4-bit weights count as the values they hold
    # Quantising a loaded model in place (the path for .gguf bases and methods' own models) gives the same
    # NF4 weights and the same logits as transformers' loader.
    quantize_in_place(plain, cfg)
    ids = torch.tensor([[1, 5, 9, 30, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, base(input_ids=ids).logits)
    model = apply_weights(base, cfg)
    assert any("lora" in type(m).__module__ and "bnb" in type(m).__module__ for m in model.modules())


# ---- whole runs: final/ reloads to the model the run trained -------------------------------------------------


def reloaded_outputs(model, tokenizer, cfg, tmp_path) -> list[str]:
    """The run's own held-out evaluation, repeated on another model."""
    from hone.methods import sft
    from hone.train.prepare import tokenize_data

    data = tokenize_data(sft.validate(cfg), tokenizer, cfg.data, tmp_path / "rejects.jsonl")
    evaluate = sft.generation_evaluator(cfg, tokenizer, data.held_out_conversations, data.labels)
    return evaluate(model)["outputs"]


@pytest.mark.parametrize("method", [*METHODS, "prefix-mlp"])
def test_run_saves_an_adapter_that_reloads_to_the_same_model(tiny_config, tmp_path, method):
    from hone.models.load import load_model

    mlp = method == "prefix-mlp"  # trains an MLP that makes the prefix; final/ holds the prefix it made
    method = "prefix" if mlp else method
    raw = adapter_config(tiny_config, method, **({"learning_rate": 1e-2} if mlp else {}))
    raw["virtual_tokens"].update(prefix_projection=mlp, prefix_projection_size=32)
    raw["eval"] = {"enabled": True, "max_new_tokens": 4}
    out = run(raw)
    run_dir = out.run_dir
    assert (run_dir / "final" / "adapter_config.json").is_file()
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == {"qlora": "LORA", "prefix": "PREFIX_TUNING", "prompt": "PROMPT_TUNING"}[method]
    manifest = json.loads((run_dir / "manifest.json").read_text())["training"]
    assert 0 < manifest["trainable_params"] < manifest["total_params"] and manifest["peak_memory_mb"] > 0
    saved = sum(v.numel() for v in final_weights(run_dir).values())
    assert saved == 8 * 2 * 2 * 32 if mlp else saved == manifest["trainable_params"]  # 8 x (k, v) x 2 layers x 32
    in_memory_val = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    assert in_memory_val["split"] == "validation" and in_memory_val["step"] == 12
    tuned = json.loads((run_dir / "eval_tuned.json").read_text())["outputs"]

    cfg, base, _, task = prepared(raw, tmp_path)
    loaded = load_model(str(run_dir))
    # peft leaves a reloaded prompt encoder's requires_grad on (harmless: evaluation runs without gradients)
    assert all("prompt_encoder" in n for n, p in loaded.model.named_parameters() if p.requires_grad)
    reloaded_val = held_out_loss(loaded.model, task)
    assert reloaded_val < held_out_loss(base, task) - 0.05  # the reloaded adapter is the trained one
    if method != "qlora":
        assert reloaded_val == pytest.approx(in_memory_val["loss"], rel=1e-5)
        assert reloaded_outputs(loaded.model, loaded.tokenizer, cfg, tmp_path) == tuned
        return
    # qlora: load_model puts the adapter over the unquantised base (close, not equal: the run trained against
    # NF4 weights); over the same 4-bit base it is the in-memory model exactly.
    assert reloaded_val == pytest.approx(in_memory_val["loss"], rel=0.05)
    from peft import PeftModel

    from hone.models.adapters import load_quantized

    quantized = load_quantized(cfg)
    model = PeftModel.from_pretrained(quantized.model, run_dir / "final", is_trainable=False).eval()
    assert held_out_loss(model, task) == pytest.approx(in_memory_val["loss"], rel=1e-5)
    assert reloaded_outputs(model, quantized.tokenizer, cfg, tmp_path) == tuned


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_resume_after_a_crash_gives_the_same_weights(tiny_config, tmp_path, monkeypatch, method):
    import hone.train.loop as loop

    raw = adapter_config(tiny_config, method, max_steps=8, save_every=2, keep_checkpoints=10)
    raw["name"] = "resumable"
    expected = final_weights(run(dict(raw, output_dir=str(tmp_path / "reference"))).run_dir)

    class Crash(RuntimeError):
        pass

    real_save = loop.save_checkpoint

    def save_then_crash(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 4:
            raise Crash("killed after the step-4 checkpoint")
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash):
        run(raw)
    run_dir = Path(raw["output_dir"]) / "resumable"
    assert not (run_dir / "final").exists()
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    got = final_weights(run(raw, resume=True).run_dir)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after resume"
    events = (run_dir / "events.jsonl").read_text()
    assert "resumed from step-000004" in events


# ---- qlora where it cannot run: a clear error before any model loads -----------------------------------------


def forbid_model_loading(monkeypatch):
    import hone.models.adapters as adapters
    import hone.train.run as run_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the qlora check")

    monkeypatch.setattr(run_module, "load_model", refuse)
    monkeypatch.setattr(adapters, "load_quantized", refuse)


def test_qlora_without_bitsandbytes_says_why_before_loading(tiny_config, monkeypatch):
    from hone.models.adapters import AdapterError, bitsandbytes_problem

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    assert "bitsandbytes is not installed" in bitsandbytes_problem(torch.device("cpu"))
    forbid_model_loading(monkeypatch)
    with pytest.raises(AdapterError, match=r"qlora needs bitsandbytes.*not installed.*pip install 'hone\[qlora\]'"):
        run(adapter_config(tiny_config, "qlora"))


@needs_bnb
def test_qlora_on_an_unsupported_device_says_why(tiny_config, monkeypatch):
    import bitsandbytes.functional as bnbf

    from hone.models.adapters import AdapterError

    def no_kernel(*args, **kwargs):
        raise NotImplementedError("no 4-bit kernel for this device")

    monkeypatch.setattr(bnbf, "quantize_4bit", no_kernel)
    forbid_model_loading(monkeypatch)
    with pytest.raises(AdapterError, match=r"cannot run a 4-bit layer on cpu.*no 4-bit kernel"):
        run(adapter_config(tiny_config, "qlora"))


def test_cli_reports_qlora_problem_as_a_user_error(tiny_config, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import hone.models.adapters as adapters
    from hone.cli import app

    monkeypatch.setattr(adapters, "bitsandbytes_problem", lambda device: "bitsandbytes is not installed")
    forbid_model_loading(monkeypatch)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(adapter_config(tiny_config, "qlora")))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    assert "qlora needs bitsandbytes" in result.output and "lora" in result.output


def test_objectives_that_bypass_peft_refuse_prompt_learning():
    from hone.models.adapters import AdapterError, check_supported

    for method in ("dpo", "reward", "contrastive"):
        cfg = parse_config({"method": method, "adapter": "prefix", "data": {"train": "x.jsonl"}})
        with pytest.raises(AdapterError, match=f"'prefix' does not work with method '{method}'.*lora"):
            check_supported(cfg)
    for method in ("prompt", "cpt", "distill", "rlhf"):
        check_supported(parse_config({"method": method, **({} if method == "prompt" else {"adapter": "prompt"}),
                                      "data": {"train": "x.jsonl"}}))


def test_lora_keeps_the_direct_decoder_path(tiny_config, tmp_path, monkeypatch):
    """Only prompt-learning adapters take the slower per-example path."""
    import hone.methods.sft as sft
    from hone.models.adapters import apply_weights, is_prompt_learning

    cfg, base, tok, task = prepared(dict(tiny_config, method="lora"), tmp_path)
    model = apply_weights(base, cfg)
    assert not is_prompt_learning(model)
    monkeypatch.setattr(sft, "virtual_token_hidden_states", lambda *a: pytest.fail("slow path taken"))
    assert held_out_loss(model, task) > 0


def test_prompt_tuning_generates_without_left_padding():
    """peft's prompt tuning shifts positions through left padding: its prompts are batched by equal length."""
    from hone.eval.runners import prompt_batches

    lengths = [5, 3, 5, 3, 7, 5]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    assert prompt_batches(order, lengths, 2, equal_lengths=True) == [[1, 3], [0, 2], [5], [4]]
    assert prompt_batches(order, lengths, 4, equal_lengths=False) == [[1, 3, 0, 2], [5, 4]]


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_only_prompt_tuning_is_shifted_by_left_padding(tiny_model_dir, method):
    """Why the evaluator batches prompt-tuned prompts by equal length: with left padding, peft's prompt tuning
    scores a prompt differently than alone (prefix tuning does not), and the evaluator knows which is which."""
    from hone.data.template import render_prompt
    from hone.eval.runners import _padding_shifts_positions
    from hone.records import Message

    model, tok = prompt_model(tiny_model_dir, method)
    prompt = render_prompt(tok, [Message("user", "where is my package?")])

    def first_scores(ids, mask):
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True,
                                  pad_token_id=tok.pad_token_id).scores[0][-1]

    alone = first_scores(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
    padded_ids = torch.tensor([[tok.pad_token_id] * 3 + prompt])
    padded = first_scores(padded_ids, torch.tensor([[0] * 3 + [1] * len(prompt)]))
    shifted = not torch.allclose(alone, padded, rtol=1e-4, atol=1e-4)
    assert shifted == (method == "prompt") == _padding_shifts_positions(model)
