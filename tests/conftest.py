"""Shared fixtures: a tiny random Llama + tokenizer built locally once per session, and toy data files.

Nothing here downloads anything. The toy task is keyword routing: each label has its own keywords, so a
2-layer model can learn it in a few dozen steps, which lets tests check that tuning really helps.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TOY_KEYWORDS = {
    "billing": ["charged", "invoice", "payment"],
    "shipping": ["package", "delivery", "courier"],
    "login": ["password", "sign", "locked"],
}
FILLER = ["please help", "hello team", "quick question", "thanks a lot", "this is urgent", "good morning"]


def toy_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(TOY_KEYWORDS)[i % len(TOY_KEYWORDS)]
        text = f"{rng.choice(FILLER)} my {rng.choice(TOY_KEYWORDS[label])} {rng.choice(FILLER)} {i}"
        rows.append({"text": text, "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls: a second thread only adds synchronisation, and on a shared CPU it costs 10-100x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from hone.models.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """(model, tokenizer) loaded fresh per use is costly; tests that mutate the model should load their own."""
    from hone.models.load import load_model

    loaded = load_model(str(tiny_model_dir))
    return loaded.model, loaded.tokenizer


@pytest.fixture
def toy_files(tmp_path) -> tuple[Path, Path]:
    """(train.jsonl with 90 rows, test.jsonl with 30 rows) of the keyword-routing task."""
    return write_jsonl(tmp_path / "train.jsonl", toy_rows(90, 1)), write_jsonl(tmp_path / "test.jsonl", toy_rows(30, 2))


@pytest.fixture
def tiny_config(tiny_model_dir, toy_files, tmp_path):
    """A small but complete run config dict for the tiny model on the toy task."""
    train, test = toy_files
    return {
        "output_dir": str(tmp_path / "runs"),
        "model": {"base": str(tiny_model_dir)},
        "data": {"train": str(train), "validation": str(test), "max_seq_len": 256},
        "train": {"max_steps": 6, "learning_rate": 3e-3, "batch_tokens": 512, "log_every": 1, "save_every": 2,
                  "eval_every": 3, "warmup_ratio": 0.0, "threads": 1},
        "eval": {"max_new_tokens": 4, "enabled": False},
    }
