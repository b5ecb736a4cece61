"""Distillation on tiny models: the KL loss by hand, shrinking a model, logit and sequence-level runs, caches.

Two teachers are trained once per module on the toy routing task (100 full fine-tuning steps each, the
recipe test_loop uses to reach high accuracy): one shares the student's tokenizer (logit distillation), one
has a smaller vocabulary (sequence-level distillation).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hone.config import ConfigError, parse_config
from hone.methods import distill
from hone.models.shrink import LayerSpecError, layer_indices, shrink_model
from hone.train.prepare import DataProblems
from hone.train.run import run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")
INSTRUCTION = "Route: {labels}."


def run(cfg: dict, **kw):
    return run_training(parse_config(cfg), show_progress=False, **kw)


def run_config(base, train, test, out_dir, **sections) -> dict:
    cfg = {"output_dir": str(out_dir), "model": {"base": str(base)},
           "data": {"train": str(train), "validation": str(test), "max_seq_len": 256, "instruction": INSTRUCTION},
           "train": {"max_steps": 100, "learning_rate": 3e-3, "batch_tokens": 512, "log_every": 10,
                     "save_every": 1000, "eval_every": 1000, "warmup_ratio": 0.0, "threads": 1},
           "eval": {"enabled": True, "max_new_tokens": 6}}
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from conftest import toy_rows, write_jsonl

    d = tmp_path_factory.mktemp("toy")
    return write_jsonl(d / "train.jsonl", toy_rows(90, 1)), write_jsonl(d / "test.jsonl", toy_rows(30, 2))


@pytest.fixture(scope="module")
def teacher_run(tiny_model_dir, toy, tmp_path_factory, one_torch_thread):
    """A 2-layer tiny model fully fine-tuned on the toy task: the teacher that shares the student's tokenizer."""
    out = run(run_config(tiny_model_dir, *toy, tmp_path_factory.mktemp("teacher"), method="full"))
    assert out.summary["eval"]["tuned"]["accuracy"] >= 0.9, out.summary["eval"]
    return out.run_dir


@pytest.fixture(scope="module")
def other_vocab_teacher(toy, tmp_path_factory, one_torch_thread):
    """A teacher whose tokenizer has a different vocabulary (320 tokens instead of 384), trained the same way."""
    from hone.models.load import save_hf_dir
    from hone.models.tiny import build_model, build_tokenizer

    root = tmp_path_factory.mktemp("teacher320")
    tok = build_tokenizer(vocab_size=320)
    save_hf_dir(build_model(tok, seed=1), tok, root / "base")
    out = run(run_config(root / "base", *toy, root / "runs", method="full"))
    # Labels take more tokens in the smaller vocabulary ("shipping" is 5), so it learns a little slower.
    assert out.summary["eval"]["tuned"]["accuracy"] >= 0.7, out.summary["eval"]
    return out.run_dir


# --- the loss ----------------------------------------------------------------------------------------------


def test_distill_terms_match_a_hand_computation():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    labels, weights = torch.tensor([0, 2]), torch.tensor([1.0, 0.5])
    T, alpha = 2.0, 0.3

    def softmax(xs):
        e = [math.exp(x) for x in xs]
        return [v / sum(e) for v in e]

    def kl(s_row, t_row):  # KL(p_teacher || q_student), both at temperature T
        p, q = softmax([x / T for x in t_row]), softmax([x / T for x in s_row])
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    kls = [kl(s, t) for s, t in zip(student.tolist(), teacher.tolist())]
    ces = [-math.log(softmax(s)[y]) for s, y in zip(student.tolist(), labels.tolist())]  # CE at T=1
    w = weights.tolist()
    want_loss = sum(wi * (alpha * T * T * k + (1 - alpha) * c) for wi, k, c in zip(w, kls, ces))

    assert distill.forward_kl(student, teacher, T).tolist() == pytest.approx(kls, rel=1e-5)
    loss, kl_sum, ce_sum = distill.distill_terms(student, teacher, labels, weights, alpha=alpha, temperature=T)
    assert float(loss) == pytest.approx(want_loss, rel=1e-5)
    assert float(kl_sum) == pytest.approx(sum(wi * k for wi, k in zip(w, kls)), rel=1e-5)
    assert float(ce_sum) == pytest.approx(sum(wi * c for wi, c in zip(w, ces)), rel=1e-5)
    # alpha=1 is the pure T^2-scaled KL; equal logits give zero KL.
    only_kl = distill.distill_terms(student, teacher, labels, weights, alpha=1.0, temperature=T)[0]
    assert float(only_kl) == pytest.approx(T * T * sum(wi * k for wi, k in zip(w, kls)), rel=1e-5)
    assert distill.forward_kl(teacher, teacher, T).abs().max() < 1e-6


def test_kl_ignores_padding_columns_of_the_larger_head():
    student, teacher = torch.randn(3, 5), torch.randn(3, 5)
    padded = torch.cat([teacher, torch.full((3, 2), 9.0)], dim=1)  # two extra vocabulary rows
    labels, weights = torch.tensor([0, 1, 2]), torch.ones(3)
    a = distill.distill_terms(student, teacher, labels, weights, alpha=0.5, temperature=2.0)
    b = distill.distill_terms(student, padded, labels, weights, alpha=0.5, temperature=2.0)
    assert torch.allclose(a[0], b[0])


def test_teacher_gets_no_gradient_student_does(tiny_model_dir, toy, tmp_path):
    from hone.methods import sft
    from hone.models.load import load_model
    from hone.train.runlog import RunLog

    cfg = parse_config(run_config(tiny_model_dir, *toy, tmp_path))
    student, teacher = load_model(str(tiny_model_dir)), load_model(str(tiny_model_dir))
    teacher.model.requires_grad_(False)
    task = sft.build(cfg, sft.validate(cfg), student.model, student.tokenizer, tmp_path, RunLog(tmp_path))
    batch = task.held_out[0]
    loss_sum = distill.logit_distill_loss(teacher.model, alpha=0.5, temperature=2.0)
    loss, stats = loss_sum(student.model, batch)
    loss.backward()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(p.grad is not None for p in student.model.parameters())
    # Same weights in both: the KL is zero, so the loss is half the SFT loss and the CE stat is the SFT loss.
    assert float(stats["distill_kl"]) == pytest.approx(0.0, abs=1e-5)
    assert float(stats["reference_ce"]) == pytest.approx(float(sft.sft_loss_sum(student.model, batch).detach()),
                                                         rel=1e-5)
    assert float(loss) == pytest.approx(0.5 * float(stats["reference_ce"]), rel=1e-5)


# --- shrinking -----------------------------------------------------------------------------------------------


def test_layer_specs():
    assert layer_indices("every-other", 30) == list(range(0, 30, 2))
    assert layer_indices("every-other", 5) == [0, 2, 4]
    assert layer_indices("first:3", 8) == [0, 1, 2]
    assert layer_indices(" 1, 3 ", 4) == [1, 3]
    for spec, n, message in [("every-third", 4, "expected 'every-other'"), ("first:0", 4, "N >= 1"),
                             ("3,1", 4, "increasing order"), ("1,1", 4, "increasing order"),
                             ("0,4", 4, "has 4 layers"), ("first:2", 2, "keeps all 2 layers"),
                             ("-1", 4, "start at 0")]:
        with pytest.raises(LayerSpecError, match=message):
            layer_indices(spec, n)


def test_shrunk_model_keeps_the_right_layers_generates_and_reloads(tmp_path):
    from hone.models.load import load_model, save_hf_dir
    from hone.models.tiny import build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, layers=4)
    before = {i: {k: v.clone() for k, v in model.model.layers[i].state_dict().items()} for i in range(4)}
    n_before = sum(p.numel() for p in model.parameters())
    shrink_model(model, layer_indices("1,3", 4))
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    for new, old in enumerate([1, 3]):
        for k, v in model.model.layers[new].state_dict().items():
            assert torch.equal(v, before[old][k]), (new, k)
    assert sum(p.numel() for p in model.parameters()) < n_before
    # Generation with the KV cache needs the renumbered cache slots (kept layer 3 would write slot 3 of 2).
    ids = torch.tensor([tok.encode("hello team my package")])
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] > ids.shape[1]
    save_hf_dir(model, tok, tmp_path / "small")
    reloaded = load_model(str(tmp_path / "small")).model
    assert reloaded.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)


def test_cli_model_shrink(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from hone.cli import app
    from hone.models.load import load_model

    runner = CliRunner()
    ok = runner.invoke(app, ["model", "shrink", str(tiny_model_dir), "--keep", "every-other", "--out",
                             str(tmp_path / "small")])
    assert ok.exit_code == 0, ok.output
    assert "kept layers [0] of 2" in ok.output
    assert load_model(str(tmp_path / "small")).model.config.num_hidden_layers == 1
    again = runner.invoke(app, ["model", "shrink", str(tiny_model_dir), "--out", str(tmp_path / "small")])
    assert again.exit_code == 2 and "not empty" in again.output
    bad = runner.invoke(app, ["model", "shrink", str(tiny_model_dir), "--keep", "first:9", "--out",
                              str(tmp_path / "other")])
    assert bad.exit_code == 2 and "has 2 layers" in bad.output


def test_shrunk_lora_student_saves_merged_and_reloads(tmp_path, tiny_model_dir, toy):
    from peft import LoraConfig, get_peft_model

    from hone.models.load import load_model

    cfg = parse_config(run_config(tiny_model_dir, *toy, tmp_path, method="distill",
                                  distill={"teacher": str(tiny_model_dir), "student_layers": "first:1"}))
    loaded = distill.load(cfg)
    assert loaded.model.config.num_hidden_layers == 1
    model = get_peft_model(loaded.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    distill.save(model, loaded.tokenizer, cfg, tmp_path / "final")
    assert not (tmp_path / "final" / "adapter_config.json").exists()  # merged: loads without the big base
    reloaded = load_model(str(tmp_path / "final")).model
    ids = torch.tensor([loaded.tokenizer.encode("my invoice please")])
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-5)


# --- tokenizers and config errors ------------------------------------------------------------------------


def test_tokenizer_match():
    from hone.models.tiny import build_tokenizer

    a, b = build_tokenizer(), build_tokenizer()
    assert distill.tokenizer_mismatch(a, b) is None
    assert "vocabularies differ (384 vs 320" in distill.tokenizer_mismatch(a, build_tokenizer(vocab_size=320))
    b.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
    assert "chat templates" in distill.tokenizer_mismatch(a, b)


def test_config_errors_before_any_model_loads(tmp_path, tiny_model_dir, toy):
    def error(adapter=None, train=toy[0], **distill_section) -> str:
        cfg = run_config(tiny_model_dir, train, toy[1], tmp_path / "runs", method="distill", adapter=adapter,
                         distill=distill_section)
        with pytest.raises((ConfigError, DataProblems)) as e:
            run(cfg)
        assert not (tmp_path / "runs").exists()  # stopped before the run directory (and any model)
        return str(e.value)

    assert "distill.teacher is not set" in error()
    assert "does not exist" in error(teacher=str(tmp_path / "nope"))
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("model: {base: x}\n")
    assert "without final/" in error(teacher=str(unfinished))
    (tmp_path / "notes.txt").write_text("x")
    assert "not a .gguf" in error(teacher=str(tmp_path / "notes.txt"))
    assert "distill.student_layers: layers 'every-third'" in error(teacher=str(tiny_model_dir),
                                                                   student_layers="every-third")
    assert "adapter 'prefix'" in error(adapter="prefix", teacher=str(tiny_model_dir), student_layers="first:1")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(toy[0].read_text() + '{"question": "no answer field"}\n')
    assert f"{bad}:91" in error(train=bad, teacher=str(tiny_model_dir))


def test_logits_mode_refuses_a_teacher_with_another_tokenizer(tiny_model_dir, toy, tmp_path):
    from hone.models.load import Loaded
    from hone.models.tiny import build_model, build_tokenizer

    other = build_tokenizer(vocab_size=320)
    teacher = Loaded(build_model(other), other, "other")
    cfg = parse_config(run_config(tiny_model_dir, *toy, tmp_path, method="distill",
                                  distill={"teacher": str(tiny_model_dir), "mode": "logits"}))
    with pytest.raises(ConfigError, match="distill.mode=logits needs the teacher to share"):
        distill.pick_mode(cfg, build_tokenizer(), teacher)
    auto = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"mode": "auto"})})
    assert distill.pick_mode(auto, build_tokenizer(), teacher)[0] == "sequence"


# --- whole runs ----------------------------------------------------------------------------------------------


def metric_rows(run_dir: Path, split: str) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_logit_distillation_into_a_shrunk_student_raises_agreement(teacher_run, tiny_model_dir, toy, tmp_path):
    from hone.models.load import load_model

    cfg = run_config(tiny_model_dir, *toy, tmp_path, method="distill", adapter="full",
                     distill={"teacher": str(teacher_run), "student_layers": "every-other"})
    cfg["train"].update(max_steps=80, eval_every=40)
    out = run(cfg)
    ev = out.summary["eval"]
    base, tuned = ev["base"], ev["tuned"]
    assert base["teacher_accuracy"] == tuned["teacher_accuracy"] >= 0.9
    assert base["teacher_agreement"] <= 0.4 and tuned["teacher_agreement"] >= 0.8, ev
    assert tuned["accuracy"] >= base["accuracy"] + 0.5 and ev["primary"] == "accuracy"
    events = (out.run_dir / "events.jsonl").read_text()
    assert "logits mode (auto: the tokenizers match)" in events
    train_rows, val_rows = metric_rows(out.run_dir, "train"), metric_rows(out.run_dir, "validation")
    assert {"distill_kl", "reference_ce"} <= set(train_rows[-1]) and "distill_kl" in val_rows[-1]
    assert val_rows[-1]["distill_kl"] < val_rows[0]["distill_kl"]
    assert out.summary["training"]["total_params"] < sum(
        p.numel() for p in load_model(str(teacher_run)).model.parameters())
    student = load_model(str(out.run_dir)).model  # final/ is a full 1-layer model
    assert student.config.num_hidden_layers == 1


def test_sequence_distillation_from_a_teacher_with_another_tokenizer(other_vocab_teacher, tiny_model_dir, toy,
                                                                     tmp_path, monkeypatch):
    from hone.eval.runners import generate
    from hone.models.load import load_model

    cfg = run_config(tiny_model_dir, *toy, tmp_path, method="distill", adapter="full",
                     distill={"teacher": str(other_vocab_teacher)})
    cfg["train"].update(max_steps=100)
    out = run(cfg)
    d = out.run_dir
    assert "sequence mode (auto: their vocabularies differ (384 vs 320 tokens))" in (d / "events.jsonl").read_text()
    data = distill.sft.validate(parse_config(cfg))
    cached = [json.loads(x) for x in (d / distill.TEACHER_OUTPUTS).read_text().splitlines()]
    assert len(cached) == len(data.train) == 90  # one answer per training prompt
    # The cache holds what the teacher writes for those prompts.
    teacher = load_model(str(other_vocab_teacher))
    prompts = [c.prompt_messages() for c in data.train[:5]]
    fresh = generate(teacher.model, teacher.tokenizer, prompts, max_new_tokens=6)
    assert [r["output"] for r in cached[:5]] == fresh
    assert [r["key"] for r in cached[:5]] == [distill.prompt_key(p) for p in prompts]
    ev = out.summary["eval"]
    assert ev["base"]["teacher_agreement"] <= 0.4 and ev["tuned"]["teacher_agreement"] >= 0.8, ev
    assert ev["tuned"]["accuracy"] >= ev["base"]["accuracy"] + 0.5

    # Resuming reuses both caches: the teacher writes nothing, and the files stay byte for byte.
    before = {name: (d / name).read_bytes() for name in (distill.TEACHER_OUTPUTS, distill.TEACHER_HELDOUT)}
    asked = []
    real_answerer = distill.teacher_answerer
    monkeypatch.setattr(distill, "teacher_answerer", lambda c, t: (lambda ps: asked.append(ps) or
                                                                  real_answerer(c, t)(ps)))
    again = run(cfg, resume=True)
    assert again.run_dir == d and asked == []
    assert {name: (d / name).read_bytes() for name in before} == before


def test_cached_answers_continue_an_interrupted_file(tmp_path):
    from hone.records import Message

    prompts = [[Message("user", f"question {i}")] for i in range(10)]
    asked: list[int] = []

    def answer(batch):
        asked.append(len(batch))
        return [f"answer to {p[0].content}" for p in batch]

    path = tmp_path / "answers.jsonl"
    first, made = distill.cached_answers(path, prompts[:4], answer)
    assert made == 4 and first[2] == "answer to question 2"
    with path.open("a") as f:
        f.write('{"key": "cut sho')  # a crash in the middle of a line
    answers, made = distill.cached_answers(path, prompts + prompts[:2], answer)  # duplicates asked once
    assert made == 6 and asked == [4, 6]
    assert answers == [f"answer to question {i}" for i in range(10)] + ["answer to question 0", "answer to question 1"]
    assert len(path.read_text().splitlines()) == 10
    assert distill.cached_answers(path, prompts, answer)[1] == 0 and asked == [4, 6]


@pytest.mark.slow
def test_embedded_model_shrinks_to_every_other_layer(tmp_path):
    from hone.config import EMBEDDED_MODEL
    from hone.models.load import load_model
    from hone.models.shrink import shrink_to_dir

    info = shrink_to_dir(EMBEDDED_MODEL, "every-other", tmp_path / "small")
    assert (info["layers_before"], info["layers_after"]) == (30, 15)
    assert info["params_after"] < 0.65 * info["params_before"]
    small = load_model(str(tmp_path / "small"))
    ids = torch.tensor([small.tokenizer.encode("What is the capital of France?")])
    cached = small.model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(cached, small.model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False))
