"""`hone review`: prompts from any accepted shape, cached answers, a blind seeded A/B order, scripted key
presses mapped back to the runs, resume, the Wilson interval, and the export that method dpo accepts."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from hone.eval import review as rv
from hone.records import Message

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Where is my parcel?", "id": "p1"},
        {"text": "I was charged twice", "label": "billing"},
        {"messages": [{"role": "user", "content": "Reset my password"}, {"role": "assistant", "content": "Sure"}]},
        {"prompt": "Where is my parcel?", "id": "p1"},  # the same item again: judged once
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Cancel order"}]},
        {"prompt": "Refund?", "chosen": "Yes, within 30 days.", "rejected": "No."},
    ])


@pytest.fixture(scope="module")
def second_model_dir(tmp_path_factory) -> Path:
    from hone.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-b", seed=1)


def test_wilson_interval_by_hand():
    # 8 of 10: p=0.8, z^2=3.8415; centre=(0.8+0.19207)/1.38415=0.71674; half=1.95996/1.38415*sqrt(0.016+0.0096)
    lo, hi = rv.wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert rv.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert rv.wilson_interval(0, 0) is None


def test_read_items_every_shape(prompts_file):
    items = rv.read_items(prompts_file)
    assert [it.prompt for it in items] == ["Where is my parcel?", "I was charged twice", "Reset my password",
                                           "Cancel order", "Refund?"]
    assert items[0].id == "p1" and len({it.id for it in items}) == 5
    assert items[1].messages[0].role == "system" and "billing" in items[1].messages[0].content
    assert [m.role for m in items[2].messages] == ["user"]  # the answer is not shown to the models
    assert [m.role for m in items[3].messages] == ["system", "user"]
    assert rv.read_items(prompts_file, limit=2) == items[:2]
    assert rv.read_items(prompts_file)[1].id == items[1].id  # content ids are stable


def test_read_items_bad_lines_name_the_line(tmp_path):
    from hone.train.prepare import DataProblems

    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": ""}, "{not json",
                                                {"prompt": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "x"}]}])
    with pytest.raises(DataProblems) as e:
        rv.read_items(path)
    text = str(e.value)
    assert "bad.jsonl:2" in text and "'prompt' is empty" in text and "bad.jsonl:3" in text
    assert "bad.jsonl:4" in text and "ends with an assistant message" in text


def test_order_is_blind_and_seeded():
    flips = [rv.a_is_run_a(f"item-{i}", seed=0) for i in range(60)]
    assert 15 < sum(flips) < 45  # both orders, about half each
    assert flips == [rv.a_is_run_a(f"item-{i}", seed=0) for i in range(60)]
    assert flips != [rv.a_is_run_a(f"item-{i}", seed=1) for i in range(60)]


def scripted(keys: str, notes: list[str]):
    stream, note_stream = iter(keys), iter(notes)
    return (lambda: next(stream, "")), (lambda: next(note_stream))


def test_session_maps_keys_to_runs_and_resumes(prompts_file, tmp_path):
    items = rv.read_items(prompts_file)
    answers = {}
    for it in items:
        answers[(rv.model_key("A-model"), it.id)] = f"answer of A to {it.prompt}"
        answers[(rv.model_key("B-model"), it.id)] = f"answer of B to {it.prompt}"
    results = tmp_path / "review.jsonl"
    console = Console(file=io.StringIO(), width=100)
    read_key, read_note = scripted("a?nb q", ["  clearer  "])  # '?' is unknown, ' ' ignored, q quits
    assert rv.review_session(items, answers, "A-model", "B-model", results, console=console, read_key=read_key,
                             read_note=read_note) == 2
    shown = console.file.getvalue()
    assert "unknown key '?'" in shown and "Where is my parcel?" in shown
    assert "A-model" not in shown and "B-model" not in shown  # blind: run names are never shown
    rows = rv.read_results(results)
    for row, key in zip(rows, ("a", "b")):
        pressed_first = (row["shown_as_a"] == "run_a") == (key == "a")
        assert row["winner"] == ("run_a" if pressed_first else "run_b")
        assert row["answer_run_a"].startswith("answer of A") and row["answer_run_b"].startswith("answer of B")
    assert rows[0]["note"] == "" and rows[1]["note"] == "clearer"
    assert rows[0]["shown_as_a"] == ("run_a" if rv.a_is_run_a(items[0].id, 0) else "run_b")

    read_key, read_note = scripted("txt", [])  # resumed: the two judged items are skipped
    assert rv.review_session(items, answers, "A-model", "B-model", results, console=console, read_key=read_key,
                             read_note=read_note) == 3
    rows = rv.read_results(results)
    assert [r["id"] for r in rows] == [it.id for it in items]
    assert [r["choice"] for r in rows[2:]] == ["tie", "both_bad", "tie"]
    s = rv.summarize(rows)
    assert (s["tie"], s["both_bad"], s["decisive"]) == (2, 1, 2)
    assert s["ci95"] == pytest.approx(rv.wilson_interval(s["run_b"], 2))
    with pytest.raises(rv.ReviewError, match="give another --out"):
        rv.check_same_runs(rows, "B-model", "A-model", results)


def test_answers_are_generated_once(prompts_file, tmp_path, tiny_model_dir, second_model_dir):
    items = rv.read_items(prompts_file, limit=3)
    cache = tmp_path / "r.answers.jsonl"
    models = [str(tiny_model_dir), str(second_model_dir)]
    answers = rv.ensure_answers(items, models, cache, max_new_tokens=4)
    assert len(answers) == 6 and len(cache.read_text().splitlines()) == 6
    cached = [json.loads(x) for x in cache.read_text().splitlines()]
    assert {(r["model"], r["id"]) for r in cached} == set(answers)
    assert all(isinstance(a, str) for a in answers.values())

    def must_not_generate(model, prompts, n):
        raise AssertionError("regenerated a cached answer")

    assert rv.ensure_answers(items, models, cache, 4, generate_fn=must_not_generate) == answers
    more = rv.read_items(prompts_file, limit=4)  # one new item: only it is generated, per model
    calls = []
    rv.ensure_answers(more, models, cache, 4, generate_fn=lambda m, p, n: calls.append(len(p)) or ["x"] * len(p))
    assert calls == [1, 1]


def test_export_pairs_train_dpo(tmp_path, tiny_config):
    from hone.config import parse_config
    from hone.methods import preference
    from hone.methods.pairs import parse_pair

    items = [rv.Item(f"i{k}", [Message("user", f"question {k}")]) for k in range(6)]
    items.append(rv.Item("chat", [Message("system", "Be brief."), Message("user", "question chat")]))
    rows = [rv.judgement(it, choice, "", k % 2 == 0, "A", "B", (f"A says {k}", f"B says {k}"), 1.0)
            for k, (it, choice) in enumerate(zip(items, ["a", "b", "a", "tie", "both_bad", "b", "a"]))]
    rows.append(rv.judgement(rv.Item("same", [Message("user", "q")]), "a", "", True, "A", "B", ("x", "x"), 1.0))
    path = tmp_path / "pairs.jsonl"
    assert rv.export_pairs(rows, path) == (5, 3)  # tie, both bad and identical answers are left out
    exported = [json.loads(x) for x in path.read_text().splitlines()]
    for row, pair in zip([r for r in rows if r["winner"] in ("run_a", "run_b")], exported):
        loser = "run_b" if row["winner"] == "run_a" else "run_a"
        assert (pair["chosen"], pair["rejected"]) == (row[f"answer_{row['winner']}"], row[f"answer_{loser}"])
        parse_pair(pair)
    assert exported[0] == {"prompt": "question 0", "chosen": "A says 0", "rejected": "B says 0", "id": "i0"}
    assert exported[-1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    cfg = parse_config({**tiny_config, "method": "dpo", "data": {"train": str(path), "max_seq_len": 256},
                       "preference": {"max_prompt_tokens": 128}})
    data = preference.validate(cfg)
    assert len(data.train) + len(data.held_out) == 5 and not data.problems


def test_cli_review(prompts_file, tmp_path, tiny_model_dir, second_model_dir):
    from hone.cli import app

    out = tmp_path / "r.jsonl"
    args = ["review", str(tiny_model_dir), str(second_model_dir), "--data", str(prompts_file), "--out", str(out),
            "--max-new-tokens", "4"]
    res = CliRunner().invoke(app, args, input="anfine by me\nbq")
    assert res.exit_code == 0, res.output
    assert "2 judged" in res.output and "Win rate of" in res.output and "95% Wilson interval" in res.output
    rows = rv.read_results(out)
    assert len(rows) == 2 and rows[1]["note"] == "fine by me"
    assert (tmp_path / "r.answers.jsonl").is_file()
    res = CliRunner().invoke(app, args + ["--export-pairs", str(tmp_path / "p.jsonl")], input="ttt")
    assert res.exit_code == 0, res.output
    assert "5 judged" in res.output and "3 tie(s)" in res.output
    assert len(rv.read_results(out)) == 5 and "wrote" in res.output
    summary = CliRunner().invoke(app, args + ["--summary"], input="")
    assert summary.exit_code == 0 and "5 judged" in summary.output
    swapped = ["review", str(second_model_dir), str(tiny_model_dir), "--data", str(prompts_file), "--out", str(out)]
    bad = CliRunner().invoke(app, swapped)
    assert bad.exit_code == 2 and "give another --out" in bad.output


def test_ask_reads_first_character_and_ignores_escape_sequences():
    console = Console(file=io.StringIO(), width=80)
    keys = iter(["\x1b[A", "\n", "Tx", "a"])
    assert rv.ask(console, lambda: next(keys), lambda: "") == ("tie", "")  # arrow key ignored, paste -> 't'
    assert "unknown key '?'" in console.file.getvalue()
    keys = iter(["n", "x"])
    assert rv.ask(console, lambda: next(keys), lambda: " why ") == ("both_bad", "why")
    assert rv.ask(console, lambda: "", lambda: "") == (None, "")  # end of input quits
