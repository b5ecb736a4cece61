"""`hone data card`: counts, token lengths under the model's tokenizer, duplicates, PII, estimates."""

from __future__ import annotations

import json

from hone.data.card import CardOptions, card


def test_card_counts_and_files(tmp_path, tiny_model_dir, tiny):
    rows = [{"text": f"my invoice {i} is wrong", "label": "billing"} for i in range(6)]
    rows += [{"text": "my invoice 0 is wrong", "label": "billing"}]          # exact duplicate
    rows += [{"text": "reach me at jane.doe@example.com", "label": "login"}]  # PII
    rows += [{"text": "A document with no label."}]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{oops\n")
    info = card([p], tmp_path / "card", CardOptions(model=str(tiny_model_dir), tokens_per_second=100.0))
    assert info["records"]["read"] == 10 and info["records"]["usable"] == 9
    assert info["records"]["problems_by_code"] == {"invalid_json": 1}
    assert info["shapes"] == {"document": 1, "label": 8}
    assert info["labels"] == {"billing": 7, "login": 1}
    assert info["exact_duplicates"] == 1
    assert info["pii"]["EMAIL"] == 1
    # Lengths are real tokenizations under the tiny model's chat template.
    tok = tiny[1]
    doc_len = len(tok("A document with no label.")["input_ids"])
    assert info["tokens"]["total"] > 8 * doc_len and info["tokens"]["max"] > doc_len
    est = info["estimate"]
    assert est["tokens_per_epoch"] == info["tokens"]["total"]
    assert est["seconds_per_epoch"] == round(est["tokens_per_epoch"] / 100.0, 1)
    assert (tmp_path / "card" / "token_lengths.png").stat().st_size > 1000
    assert (tmp_path / "card" / "labels.png").is_file()
    md = (tmp_path / "card" / "card.md").read_text()
    assert "exact duplicates: 1" in md and "EMAIL 1" in md


def test_estimate_without_a_measurement_uses_flops(tmp_path, tiny_model_dir):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "hi", "completion": "hello there"}) + "\n")
    lora = card([p], tmp_path / "a", CardOptions(model=str(tiny_model_dir), scan_limit=0))["estimate"]
    assert lora["tokens_per_second"] > 0 and "GFLOP/s" in lora["speed_from"]
