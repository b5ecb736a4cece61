"""Continued pretraining (method: cpt) on the tiny model: raw-text rows, block packing, loss on every token,
embedding learning rate, domain and general perplexity before/after, resume."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl
from safetensors.torch import load_file

from hone.config import parse_config
from hone.methods import RowError, cpt
from hone.train.run import run_training

# A toy "domain": a handful of sentences in shuffled order, so a 2-layer model can learn its statistics.
DOMAIN_SENTENCES = [
    "The refund was sent to the card on file.",
    "Your package left the courier depot this morning.",
    "Reset the password from the sign in page.",
    "The invoice shows the monthly subscription charge.",
    "Please restart the app after the update.",
]


def domain_docs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(DOMAIN_SENTENCES) for _ in range(rng.randint(2, 12)))} for _ in range(n)]


def run(cfg_dict, **kw):
    return run_training(parse_config(cfg_dict), show_progress=False, **kw)


@pytest.fixture
def cpt_config(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "docs.jsonl", domain_docs(60, 1))
    return {
        "method": "cpt", "adapter": "full", "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(tiny_model_dir)},
        "data": {"train": str(train), "max_seq_len": 64, "validation_fraction": 0.15},
        "train": {"max_steps": 6, "learning_rate": 3e-3, "batch_tokens": 256, "log_every": 1, "save_every": 2,
                  "eval_every": 3, "warmup_ratio": 0.0, "threads": 1, "keep_checkpoints": 10},
        "eval": {"enabled": True},
    }


def build_task(cfg_dict, tiny_model_dir, tmp_path):
    from hone.models.load import load_model
    from hone.train.runlog import RunLog

    cfg = parse_config(cfg_dict)
    loaded = load_model(str(tiny_model_dir))
    task = cpt.build(cfg, cpt.validate(cfg), loaded.model, loaded.tokenizer, tmp_path, RunLog(tmp_path))
    return cfg, loaded, task


# --- rows -------------------------------------------------------------------------------------------------


def test_rows_take_text_content_or_document():
    assert cpt.parse_document({"text": "a doc"}) == "a doc"
    assert cpt.parse_document({"content": "b doc", "id": 3}) == "b doc"
    assert cpt.parse_document({"document": "c doc"}) == "c doc"
    with pytest.raises(RowError, match="missing 'text' or 'content' or 'document'"):
        cpt.parse_document({"body": "x"})
    with pytest.raises(RowError) as chat:
        cpt.parse_document({"messages": [{"role": "user", "content": "hi"}]})
    assert chat.value.code == "not_raw_text" and "'text'" in chat.value.message and "chat" in chat.value.message


def test_chat_file_is_refused_with_its_line_before_any_model_loads(cpt_config, tmp_path):
    from hone.train.prepare import DataProblems

    bad = write_jsonl(tmp_path / "mixed.jsonl", [{"text": "one document"}, {"text": "another one"},
                                                 {"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])
    cpt_config["data"]["train"] = str(bad)
    cpt_config["model"]["base"] = str(tmp_path / "no-such-model")  # loading it would fail differently
    with pytest.raises(DataProblems) as err:
        run(cpt_config)
    message = str(err.value)
    assert f"{bad}:3: [not_raw_text]" in message and "cpt trains on raw documents" in message, message
    assert "'text'" in message


def test_missing_general_text_is_refused_before_any_model_loads(cpt_config, tmp_path):
    cpt_config["cpt"] = {"general_text": str(tmp_path / "nowhere.jsonl")}
    cpt_config["model"]["base"] = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="cpt.general_text"):
        run(cpt_config)


def test_shipped_general_text_is_a_sample_of_plain_documents():
    rows = [json.loads(x) for x in cpt.GENERAL_TEXT.read_text(encoding="utf-8").splitlines()]
    assert 40 <= len(rows) <= 80 and all(set(r) == {"text"} and len(r["text"].split()) > 40 for r in rows)
    assert len({r["text"] for r in rows}) == len(rows)


def test_held_out_is_split_by_document_and_duplicates_do_not_leak(cpt_config):
    cfg = parse_config(cpt_config)
    data = cpt.validate(cfg)
    assert data.held_out and not set(data.held_out) & set(data.train)
    assert cpt.validate(cfg).held_out == data.held_out  # deterministic
    kept, dropped = cpt.drop_duplicates(["a", "b", "a", "c", "held"], ["held"])
    assert kept == ["a", "b", "c"] and dropped == 2
    assert cpt.drop_duplicates(["a", "held", "a"], ["held"], within=False) == (["a", "a"], 1)


# --- packing ------------------------------------------------------------------------------------------------


def test_blocks_are_max_seq_len_and_cover_every_token_once(tiny):
    _, tok = tiny
    docs = [d["text"] for d in domain_docs(9, 3)] + ["short", " ".join(DOMAIN_SENTENCES * 8)]  # one very long
    sep = tok.eos_token_id
    stream = cpt.token_stream(tok, docs, sep)
    assert stream.count(sep) == len(docs) and stream[-1] == sep
    assert stream[:len(tok(docs[0], add_special_tokens=False)["input_ids"])] == tok(docs[0])["input_ids"]
    blocks = cpt.cut_blocks(stream, 64)
    assert all(len(b.input_ids) == 64 for b in blocks[:-1]) and 2 <= len(blocks[-1].input_ids) <= 64
    assert len(blocks) > 3  # the long document spans several blocks
    rebuilt = blocks[0].input_ids + [t for b in blocks[1:] for t in b.input_ids[1:]]
    assert rebuilt == stream  # consecutive blocks share one token; nothing lost, nothing repeated
    assert all(b.weights == [0.0] + [1.0] * (len(b.input_ids) - 1) for b in blocks)
    assert sum(b.n_targets for b in blocks) == len(stream) - 1  # every token after the first is a target
    assert cpt.token_stream(tok, docs, sep, max_tokens=50) == stream[:50]


def test_separator_option(tiny):
    _, tok = tiny
    assert cpt.separator_id(tok, None) == tok.eos_token_id
    assert cpt.separator_id(tok, "<|endoftext|>") == tok.convert_tokens_to_ids("<|endoftext|>")
    with pytest.raises(ValueError, match="single token"):
        cpt.separator_id(tok, "two words")


def test_loss_is_on_all_tokens_and_equals_the_models_own_lm_loss(cpt_config, tiny_model_dir, tmp_path,
                                                                 one_torch_thread):
    from hone.methods.sft import sft_loss_sum

    _, loaded, task = build_task(cpt_config, tiny_model_dir, tmp_path)
    model = loaded.model
    assert sum(len(rows) for rows in task.epoch_plan(0)) == task.stats["train_examples"] > 4
    batch = task.collate([[0], [1], [2], [3]])  # the first four blocks, one per row
    assert batch.input_ids.shape == (4, 64) and batch.real_tokens == 4 * 64  # full blocks: no padding
    assert (batch.labels[:, :-1] != -100).all() and (batch.labels[:, -1] == -100).all()
    assert (batch.weights[:, :-1] == 1).all() and batch.target_weight == 4 * 63
    assert (batch.position_ids == torch.arange(64)).all()  # one block per row, positions from 0
    with torch.no_grad():
        ours = sft_loss_sum(model, batch)
        # Hand check: the model's own causal-LM loss (mean over the 63 shifted targets of each block).
        reference = sum(model(input_ids=row[None], labels=row[None]).loss * 63 for row in batch.input_ids)
    torch.testing.assert_close(ours, reference, atol=1e-3, rtol=1e-5)


# --- embeddings ---------------------------------------------------------------------------------------------


def _lrs(optimizer) -> dict[int, float]:
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_embedding_lr_ratio_lowers_the_embedding_group_only(cpt_config, tiny_model_dir, tmp_path):
    from hone.models.adapters import apply_weights
    from hone.train.loop import build_optimizer

    cpt_config["cpt"] = {"embedding_lr_ratio": 0.1}
    cfg, loaded, _ = build_task(cpt_config, tiny_model_dir, tmp_path)
    model = apply_weights(loaded.model, cfg)
    lrs = _lrs(build_optimizer(model, cfg))
    embed = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is embed  # tied in the tiny model (and in SmolLM2)
    assert lrs[id(embed)] == pytest.approx(3e-4)
    others = [lrs[id(p)] for n, p in model.named_parameters() if "embed" not in n]
    assert others and all(lr == pytest.approx(3e-3) for lr in others)


def test_lora_can_train_the_embeddings_at_their_own_rate(cpt_config, tiny_model_dir, tmp_path):
    from hone.models.adapters import apply_weights
    from hone.train.loop import build_optimizer

    cpt_config.update(adapter="lora", cpt={"embedding_lr_ratio": 0.25, "train_embeddings": True})
    cfg, loaded, task = build_task(cpt_config, tiny_model_dir, tmp_path)
    model = apply_weights(loaded.model, cfg)
    assert not model.get_input_embeddings().weight.requires_grad
    task.before_training(model)
    lrs = _lrs(build_optimizer(model, cfg))
    assert lrs[id(model.get_input_embeddings().weight)] == pytest.approx(3e-3 * 0.25)
    lora_lrs = [lrs[id(p)] for n, p in model.named_parameters() if "lora_" in n]
    assert lora_lrs and all(lr == pytest.approx(3e-3) for lr in lora_lrs)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and not any("embed" in n for n in frozen)
    # Without train_embeddings an adapter run leaves them frozen (and build warned that the ratio is moot).
    cpt_config["cpt"]["train_embeddings"] = False
    (tmp_path / "b").mkdir()
    assert build_task(cpt_config, tiny_model_dir, tmp_path / "b")[2].before_training is None
    assert "embedding_lr_ratio=0.25 has no effect" in (tmp_path / "b" / "events.jsonl").read_text()


# --- whole runs ---------------------------------------------------------------------------------------------


def test_training_lowers_domain_perplexity_and_reports_general(cpt_config, one_torch_thread):
    cpt_config["train"].update(max_steps=30, log_every=5, eval_every=10, save_every=100)
    out = run(cpt_config)
    ev = out.summary["eval"]
    assert ev["primary"] == "domain_perplexity" and ev["task"] == "perplexity"
    base, tuned = ev["base"], ev["tuned"]
    assert set(base) == set(tuned) == {"domain_perplexity", "domain_loss", "general_perplexity", "general_loss"}
    assert tuned["domain_perplexity"] < 0.3 * base["domain_perplexity"], ev
    assert base["general_perplexity"] > 1 and tuned["general_perplexity"] > 1
    # The loop's last validation loss is the tuned model's domain loss (same blocks, same computation).
    assert out.summary["training"]["final_val_loss"] == pytest.approx(tuned["domain_loss"], rel=1e-5)
    val = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in val if r["split"] == "validation"] == [10, 20, 30]
    report = (out.run_dir / "report.md").read_text()
    assert "domain_perplexity" in report or "domain perplexity" in report
    assert "general_perplexity" in report or "general perplexity" in report
    stats = json.loads((out.run_dir / "eval_base.json").read_text())
    assert stats["n"] == len(cpt.validate(parse_config(cpt_config)).held_out)


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter_model.safetensors"))


def test_lora_with_embeddings_resumes_to_the_same_weights_and_loads_back(cpt_config, tiny_model_dir,
                                                                         one_torch_thread):
    from hone.models.load import load_model

    cpt_config.update(adapter="lora", name="resumable",
                      cpt={"embedding_lr_ratio": 0.5, "train_embeddings": True})
    cpt_config["eval"]["enabled"] = False
    first = run(cpt_config)
    expected = _final(first.run_dir)
    embed_key = next(k for k in expected if "embed_tokens" in k)
    assert not any("lm_head" in k for k in expected)  # tied: the matrix is stored once
    base_embed = load_model(str(tiny_model_dir)).model.get_input_embeddings().weight
    assert not torch.equal(expected[embed_key], base_embed)  # the embeddings did train
    loaded = load_model(str(first.run_dir)).model
    assert torch.equal(loaded.get_input_embeddings().weight, expected[embed_key])
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight

    # Pretend the run died after step 2: only that checkpoint survives; resume must end identically.
    d = first.run_dir
    for name in ("final", "checkpoints/step-000004", "checkpoints/step-000006"):
        shutil.rmtree(d / name)
    (d / "metrics.jsonl").write_text("")
    again = run(cpt_config, resume=True)
    got = _final(again.run_dir)
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), f"{k} differs after resume"
    assert "resumed from step-000002" in (d / "events.jsonl").read_text()
