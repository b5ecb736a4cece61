"""`hone data prepare`: a recipe runs its stages in order, reports each, and feeds `hone train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hone.data.recipe import RecipeError, load_recipe, prepare

INGEST = Path(__file__).parent / "fixtures" / "data" / "ingest"


def _tickets(path: Path, n: int = 60) -> Path:
    keywords = {"billing": "invoice", "shipping": "package", "login": "password"}
    rows = []
    for i in range(n):
        label = list(keywords)[i % 3]
        rows.append({"text": f"Hello,\n\nquestion {i} about my {keywords[label]}, call +1 415 555 0{100 + i}\n"
                             f"\nBest regards,\nSam", "label": label})
    rows.append(rows[0])  # a duplicate
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(tmp_path: Path, steps: list, sources=("tickets.jsonl",)) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({"sources": list(sources), "steps": steps}))
    return p


def test_recipe_runs_every_stage_with_lineage(tmp_path):
    _tickets(tmp_path / "tickets.jsonl")
    recipe = _recipe(tmp_path, [{"ingest": {}}, {"clean": {"email": "always"}}, {"redact": {"mode": "mask"}},
                                {"dedup": {}}, {"split": {"validation": 0.2, "test": 0.1}}])
    summary = prepare(recipe)
    out = tmp_path / "recipe.prepared"
    assert [s["stage"] for s in summary["stages"]] == ["ingest", "clean", "redact", "dedup", "split"]
    assert summary["stages"][3]["arithmetic"].startswith("in 61 = passed 60 + rejected 1 (duplicate 1)")
    assert set(summary["files"]) == {"train", "validation", "test"}
    train = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert all("Best regards" not in r["text"] and "<PHONE>" in r["text"] for r in train)
    assert train[0]["provenance"]["source"] == str(tmp_path / "tickets.jsonl")  # traced to the raw file
    lineage = json.loads((out / "split.report.json").read_text())["lineage"]
    chain, depth = lineage, 0
    while chain["inputs"][0].get("produced_by"):
        chain, depth = chain["inputs"][0]["produced_by"], depth + 1
    assert depth == 4 and chain["inputs"][0]["path"] == str(tmp_path / "tickets.jsonl")
    assert (out / "prepare.json").is_file()


def test_recipe_errors_name_the_step(tmp_path):
    _tickets(tmp_path / "tickets.jsonl")
    with pytest.raises(RecipeError, match=r"step 2 \(clean\): min_chars"):
        load_recipe(_recipe(tmp_path, [{"ingest": {}}, {"clean": {"min_chars": "many"}}]))
    with pytest.raises(RecipeError, match="unknown stage 'scrub'"):
        load_recipe(_recipe(tmp_path, [{"scrub": {}}]))
    with pytest.raises(RecipeError, match="'split' must be the last step"):
        load_recipe(_recipe(tmp_path, [{"split": {}}, {"clean": {}}]))
    with pytest.raises(RecipeError, match="source .*missing.jsonl not found"):
        load_recipe(_recipe(tmp_path, [{"clean": {}}], sources=("missing.jsonl",)))


def test_train_runs_the_recipe_first(tmp_path, tiny_config, one_torch_thread):
    from hone.config import parse_config
    from hone.train.run import run_training

    _tickets(tmp_path / "tickets.jsonl")
    recipe = _recipe(tmp_path, [{"clean": {}}, {"dedup": {}}, {"split": {"validation": 0.2, "test": 0}}])
    raw = dict(tiny_config)
    raw["data"] = {"prepare": str(recipe), "max_seq_len": 256}
    outcome = run_training(parse_config(raw), show_progress=False)
    manifest = json.loads((outcome.run_dir / "manifest.json").read_text())
    assert manifest["data"]["train"].endswith("recipe.prepared/train.jsonl")
    assert manifest["data"]["validation"].endswith("recipe.prepared/validation.jsonl")
    assert manifest["data"]["lineage"]["config"]["validation"] == 0.2
    assert outcome.run_dir.name.startswith("recipe-lora")


def test_mailbox_to_private_chat_examples(tmp_path):
    """A user's path: raw mbox -> clean -> threads as chats -> pseudonymised; no customer name survives."""
    recipe = _recipe(tmp_path, [{"ingest": {}}, {"clean": {}},
                                {"convert": {"to": "chat", "agents": ["@acme.example"]}},
                                {"redact": {"mode": "pseudonym"}}],
                     sources=(str(INGEST / "support.mbox"), str(INGEST / "eml")))
    summary = prepare(recipe)
    rows = [json.loads(x) for x in Path(summary["files"]["train"]).read_text().splitlines()]
    assert rows, summary["stages"]
    thread = next(r for r in rows if "charged twice" in r["messages"][0]["content"])
    assert [m["role"] for m in thread["messages"]] == ["user", "assistant", "user", "assistant"]
    dumped = json.dumps(rows)
    for name in ("Ana", "Silva", "Tom", "Becker", "ana.silva@example.com"):
        assert name not in dumped, name
    assert "<PERSON_" in thread["messages"][1]["content"]  # "Hi Ana," -> "Hi <PERSON_1>,"


def test_a_step_that_keeps_nothing_stops_with_its_reasons(tmp_path):
    _tickets(tmp_path / "tickets.jsonl")
    recipe = _recipe(tmp_path, [{"clean": {"min_chars": 100000}}, {"dedup": {}}])
    with pytest.raises(RecipeError, match=r"step 1 \(clean\) kept no records \(in 61 = passed 0 \+ rejected 61 "
                                          r"\(too_short 61\)\); the reasons are in .*01-clean.rejects.jsonl"):
        prepare(recipe)
