"""`hone compare`: the prompts each strategy builds, retrieval, token counts, the statistics and the
recommendation (from hand-made results), and the command end to end on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import TOY_KEYWORDS, toy_rows, write_jsonl
from hone.cli import app
from hone.config import parse_config
from hone.data.validate import validate_file
from hone.eval import baselines as B
from hone.eval import compare as C
from hone.records import Conversation

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHORT = "Route this support ticket."
LABELS = sorted(TOY_KEYWORDS)


def records(path: Path, instruction: str = SHORT) -> list[Conversation]:
    return validate_file(path, instruction=instruction).records


# --- prompts ----------------------------------------------------------------------------------------------


def test_zero_shot_prompt_holds_instruction_label_list_and_query(toy_files):
    held = records(toy_files[1])
    prompt = B.strategy_prompts("zero_shot", held, [], instruction=SHORT, labels=LABELS)[0]
    system = prompt.messages[0]
    assert system.role == "system" and system.content.startswith(SHORT)
    assert "billing, login, shipping" in system.content  # the label list, appended to a short instruction
    assert [m.role for m in prompt.messages] == ["system", "user", "assistant"]
    assert prompt.messages[1].content == held[0].messages[-2].content
    assert prompt.reference() == held[0].reference() and prompt.label == held[0].label
    # An instruction with {labels} gets the list once, where it asks for it.
    listed = B.label_instruction("Pick one of: {labels}.", LABELS)
    assert listed == "Pick one of: billing, login, shipping."


def test_few_shot_puts_k_balanced_examples_before_the_query(toy_files):
    train, held = records(toy_files[0]), records(toy_files[1])
    picked = B.pick_few_shot(train, 5, seed=0)
    assert picked == B.pick_few_shot(train, 5, seed=0)  # deterministic
    assert picked != B.pick_few_shot(train, 5, seed=1)
    counts = sorted([train[i].label for i in picked].count(label) for label in LABELS)
    assert counts == [1, 2, 2]  # balanced: no label twice before every label once
    prompt = B.strategy_prompts("few_shot", held[:1], train, instruction=SHORT, labels=LABELS, picked=picked)[0]
    msgs = prompt.messages
    assert [m.role for m in msgs] == ["system"] + ["user", "assistant"] * 6
    for j, i in enumerate(picked):
        assert msgs[1 + 2 * j].content == train[i].messages[-2].content
        assert msgs[2 + 2 * j].content == train[i].label
    assert msgs[-2].content == held[0].messages[-2].content and msgs[-1].content == held[0].label


def test_nearest_is_cosine_nearest_on_hand_made_embeddings():
    corpus = torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 10.0], [-1.0, 0.0], [1.0, 0.0]])
    queries = torch.tensor([[2.0, 0.1], [0.0, -3.0]])
    # Query 0: rows 0 and 4 are equally near (cosine 0.9988; the lower index first), then row 2 (0.7422)
    # although its dot product (20.1) is the largest: cosine, not dot product. Query 1: rows 0, 3 and 4 are
    # orthogonal to it (cosine 0) and beat row 2 (-0.707) and row 1 (-1).
    assert B.nearest(queries, corpus, 3) == [[0, 4, 2], [0, 3, 4]]
    with pytest.raises(B.CompareError, match="compare.k=9"):
        B.nearest(queries, corpus, 9)


def test_retrieval_prompt_holds_each_querys_neighbours_nearest_last(toy_files):
    train, held = records(toy_files[0]), records(toy_files[1])
    neighbours = [[3, 7], [11, 2]]
    prompts = B.strategy_prompts("retrieval", held[:2], train, instruction=SHORT, labels=LABELS,
                                 neighbours=neighbours)
    for prompt, near in zip(prompts, neighbours):
        users = [m.content for m in prompt.messages if m.role == "user"]
        assert users == [train[near[1]].messages[-2].content, train[near[0]].messages[-2].content, users[-1]]
    tuned = B.strategy_prompts("fine_tuned_retrieval", held[:1], train, instruction=SHORT, labels=LABELS,
                               neighbours=neighbours)[0]
    assert tuned.messages[0] == held[0].messages[0]  # the trained (bare) prompt's own system message
    assert B.strategy_prompts("fine_tuned", held, train, instruction=SHORT, labels=LABELS) == held


def test_k_larger_than_training_set_is_a_clear_error():
    with pytest.raises(B.CompareError, match=r"compare.k=50 but t.jsonl has only 30 .*Lower compare.k"):
        B.check_k(["zero_shot", "few_shot"], 50, 30, "t.jsonl")
    B.check_k(["zero_shot", "fine_tuned"], 50, 30, "t.jsonl")  # no strategy puts examples in a prompt


# --- tokens -----------------------------------------------------------------------------------------------


def test_token_counts_are_the_tokenizers_count_of_the_rendered_prompt(tiny, toy_files):
    from hone.eval.runners import _generated_length, evaluate_task

    model, tok = tiny
    train, held = records(toy_files[0]), records(toy_files[1])[:5]
    convs = B.strategy_prompts("few_shot", held, train, instruction=SHORT, labels=LABELS,
                               picked=B.pick_few_shot(train, 3, 0))
    result = evaluate_task(model, tok, convs, LABELS, max_new_tokens=3, batch_size=2)
    expected = [len(tok(tok.apply_chat_template([{"role": m.role, "content": m.content}
                                                 for m in c.prompt_messages()],
                                                tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)["input_ids"]) for c in convs]
    m = result["metrics"]
    assert m["prompt_tokens_per_request"] == pytest.approx(sum(expected) / len(expected))
    assert 1 <= m["output_tokens_per_request"] <= 3
    assert m["latency_per_request"] == pytest.approx(m["seconds"] / 5)
    assert _generated_length([5, 7, 2, 0, 0], stops=[2]) == 3 and _generated_length([5, 7], stops=[2]) == 2


# --- numbers and the recommendation -----------------------------------------------------------------------


def test_paired_bootstrap_and_cost_by_hand():
    same = C.paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0], samples=500, confidence=0.95, seed=0)
    assert (same["diff"], same["low"], same["high"], same["noise"]) == (0, 0, 0, True)
    apart = C.paired_bootstrap([1.0] * 20, [0.0] * 20, samples=500, confidence=0.95, seed=0)
    assert (apart["diff"], apart["low"], apart["high"], apart["noise"]) == (1, 1, 1, False)
    lo, hi = C.bootstrap_interval([1.0] * 5 + [0.0] * 5, samples=2000, confidence=0.95, seed=0)
    assert 0.1 <= lo < 0.5 < hi <= 0.9
    prices = parse_config({"data": {"train": "x"}, "compare": {"price_per_million_input_tokens": 2,
                                                               "price_per_million_output_tokens": 10,
                                                               "price_per_hour": 3.6}}).compare
    cost = C.cost_per_1k(500, 20, 0.5, prices)  # 1000 x (500 x 2 + 20 x 10) / 1e6; 1000 x 0.5 s x 3.6 / 3600
    assert cost == pytest.approx({"tokens": 1.2, "hardware": 0.5, "total": 1.7})


def row(strategy: str, correct: int, prompt_tokens: float, latency: float, n: int = 100) -> dict:
    scores = [1.0] * correct + [0.0] * (n - correct)
    cost = prompt_tokens * 0.15 / 1000 + 2 * 0.6 / 1000
    return {"strategy": strategy, "title": B.title(strategy, 4), "primary": correct / n, "scores": scores,
            "prompt_tokens_per_request": prompt_tokens, "latency_per_request": latency,
            "cost_per_1k": {"total": cost}}


def test_recommendation_says_fine_tune_when_the_numbers_do():
    rows = [row("zero_shot", 30, 120, 0.2), row("few_shot", 49, 640, 0.31), row("fine_tuned", 90, 44.8, 0.1)]
    advice = C.recommend(rows, primary="accuracy")
    text = advice["text"]
    assert advice["verdict"] == "fine_tune"
    assert text.startswith("Fine-tune. Fine-tuned: +41.0 points accuracy, 93% fewer prompt tokens, 3.1x lower "
                           "latency and ") and "than few-shot (k=4)" in text
    assert "(90.0% vs 49.0% on 100 held-out examples; 95% interval +" in text


def test_recommendation_is_honest_when_prompting_is_as_good_or_better():
    tie = C.recommend([row("few_shot", 50, 640, 0.3), row("fine_tuned", 52, 45, 0.1)], primary="accuracy")
    assert tie["verdict"] == "within_noise"
    assert tie["text"].startswith("Within noise: fine-tuned (52.0%) and few-shot (k=4) (50.0%) differ by +2.0")
    assert "includes 0" in tie["text"] and "Fine-tuning's case is cost: 93% fewer prompt tokens" in tie["text"]
    worse = C.recommend([row("retrieval", 80, 600, 0.3), row("fine_tuned", 30, 45, 0.1)], primary="accuracy")
    assert worse["verdict"] == "prompt" and worse["text"].startswith(
        "Prompting wins: retrieval (k=4) scores 80.0% accuracy, +50.0 points above fine-tuned (30.0%")
    # A cheaper prompting strategy as good as the best one is pointed out.
    cheap = C.recommend([row("zero_shot", 79, 120, 0.2), row("few_shot", 80, 640, 0.3),
                         row("fine_tuned", 30, 45, 0.1)], primary="accuracy")
    assert "zero-shot is within noise of few-shot (k=4)" in cheap["text"]


# --- the command ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory) -> Path:
    from hone.models.tiny import write_tiny_encoder

    return write_tiny_encoder(tmp_path_factory.mktemp("encoder") / "tiny-bert", layers=1, max_positions=128)


@pytest.fixture
def compare_config(tiny_model_dir, tiny_encoder_dir, tmp_path) -> Path:
    train = write_jsonl(tmp_path / "train.jsonl", toy_rows(24, 1))
    test = write_jsonl(tmp_path / "test.jsonl", toy_rows(8, 2))
    cfg = {"name": "toy", "output_dir": str(tmp_path / "runs"), "model": {"base": str(tiny_model_dir)},
           "data": {"train": str(train), "validation": str(test), "max_seq_len": 512, "instruction": SHORT},
           "train": {"max_steps": 3, "learning_rate": 3e-3, "batch_tokens": 512, "warmup_ratio": 0.0,
                     "threads": 1, "precision": "fp32"},
           "eval": {"max_new_tokens": 3, "batch_size": 4, "metrics": ["accuracy", "macro_f1"]},
           "compare": {"k": 3, "embedding_model": str(tiny_encoder_dir), "bootstrap_samples": 200,
                       "strategies": ["zero_shot", "few_shot", "retrieval", "fine_tuned", "fine_tuned_retrieval"]}}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_compare_trains_then_writes_the_report(compare_config):
    result = invoke("compare", compare_config)
    assert result.exit_code == 0, result.output
    run_dir = compare_config.parent / "runs" / "toy"
    out = run_dir / "compare"
    for name in ("compare.json", "compare.md", "compare.html", "compare_primary.png", "compare_prompt_tokens.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "compare.json").read_text())
    assert [r["strategy"] for r in report["strategies"]] == list(B.PROMPTING + B.FINE_TUNED)
    assert report["n"] == 8 and report["primary"] == "accuracy" and report["recommendation"]
    tuned = report["strategies"][3]
    # The fine-tuned row is `hone train`'s own held-out evaluation, repeated: the same answers and metrics.
    trained = json.loads((run_dir / "eval_tuned.json").read_text())
    assert tuned["outputs"] == trained["outputs"]
    assert tuned["metrics"]["accuracy"] == trained["metrics"]["accuracy"]
    few, zero = report["strategies"][1], report["strategies"][0]
    assert few["prompt_tokens_per_request"] > zero["prompt_tokens_per_request"] > tuned["prompt_tokens_per_request"]
    assert "hone compare: 8 held-out examples" in result.output and "fine-tuned + retrieval (k=3)" in result.output
    md = (out / "compare.md").read_text()
    assert "| strategy | accuracy (95% CI) |" in md and "![primary](compare_primary.png)" in md
    # A second compare reuses the finished run instead of training again.
    before = (run_dir / "manifest.json").read_text()
    again = invoke("compare", compare_config, "--set", "compare.strategies=[zero_shot,fine_tuned]",
                   "--out", compare_config.parent / "again")
    assert again.exit_code == 0, again.output
    assert f"fine-tuned model: {run_dir}" in again.output and (run_dir / "manifest.json").read_text() == before
    assert (compare_config.parent / "again" / "compare.html").is_file()


def test_compare_bad_input_exits_2_with_where(compare_config, tmp_path):
    too_many = invoke("compare", compare_config, "--set", "compare.k=99")
    assert too_many.exit_code == 2 and "compare.k=99 but" in too_many.output
    assert not (tmp_path / "runs").exists()  # refused before training or loading anything
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("data:\n  train: x\n compare: [\n")
    result = invoke("compare", bad_yaml)
    assert result.exit_code == 2 and str(bad_yaml) in result.output and "line 3" in result.output
    missing = invoke("compare", compare_config, "--run", tmp_path / "nope")
    assert missing.exit_code == 2 and "not a finished hone run directory" in missing.output
    train = Path(yaml.safe_load(compare_config.read_text())["data"]["train"])
    with train.open("a") as f:
        f.write('{"text": "", "label": "billing"}\n')
    result = invoke("compare", compare_config)
    assert result.exit_code == 2 and f"{train}:25:" in result.output


def test_banking77_bench_split_is_deterministic_and_disjoint(tmp_path):
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    if not (root.parent / "shared" / "datasets" / "banking77" / "train.csv").is_file():
        pytest.skip("../shared/datasets/banking77 is absent")
    spec = importlib.util.spec_from_file_location("compare_banking77", root / "bench" / "compare_banking77.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--plan-only", "--out", str(tmp_path / "a")]) == 0
    assert bench.main(["--plan-only", "--out", str(tmp_path / "b")]) == 0
    read = lambda p: [json.loads(x) for x in p.read_text().splitlines()]  # noqa: E731
    train, held = read(tmp_path / "a" / "data" / "train.jsonl"), read(tmp_path / "a" / "data" / "held_out.jsonl")
    assert (len(train), len(held)) == (300, 100) and len({r["label"] for r in train}) == 10
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    assert (tmp_path / "b" / "data" / "train.jsonl").read_text() == (tmp_path / "a" / "data" / "train.jsonl").read_text()
    cfg = yaml.safe_load((tmp_path / "a" / "compare.yaml").read_text())
    assert cfg["compare"]["k"] == 10 and cfg["model"]["base"] == "smollm2-135m-instruct"
