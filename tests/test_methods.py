"""Every method checks its data before loading a model: wrong-shaped rows are named by line, with the fields
the method needs. The model path here does not exist, so reaching the loader would be a different error."""

from __future__ import annotations

import json

import pytest

from hone.config import parse_config
from hone.train.prepare import DataProblems
from hone.train.run import run_training

LABEL_ROW = {"text": "my invoice is wrong", "label": "billing"}
PAIR_ROW = {"prompt": "say hi", "chosen": "hi", "rejected": "go away"}
NEEDS = {  # objective -> (a row of some other method's shape, a phrase the error must contain)
    "cpt": (PAIR_ROW, "'text'"),
    "dpo": (LABEL_ROW, "'chosen' and 'rejected'"),
    "orpo": (LABEL_ROW, "'chosen' and 'rejected'"),
    "simpo": (LABEL_ROW, "'chosen' and 'rejected'"),
    "reward": (LABEL_ROW, "'chosen' and 'rejected'"),
    "rlhf": (PAIR_ROW, "reference"),
    "contrastive": (LABEL_ROW, "positive"),
    "sft": (PAIR_ROW, "dpo"),
}


@pytest.mark.parametrize("objective", sorted(NEEDS))
def test_wrong_data_is_refused_by_line_before_any_model_loads(objective, tmp_path):
    row, phrase = NEEDS[objective]
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(row) + "\n" + json.dumps(row | {"n": 2}) + "\n")
    raw = {"method": objective, "output_dir": str(tmp_path / "runs"), "data": {"train": str(data)},
           "model": {"base": str(tmp_path / "no-such-model")}}
    if objective == "rlhf":
        raw["rlhf"] = {"reward": "exact_match"}
    if objective == "contrastive":
        raw["model"] = {"base": "all-minilm-l6-v2"}
    with pytest.raises(DataProblems) as err:
        run_training(parse_config(raw), show_progress=False)
    message = str(err.value)
    assert f"{data}:1:" in message and f"{data}:2:" in message, message
    assert phrase in message, message
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("eval_base.json"))
