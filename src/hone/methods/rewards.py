"""Rewards for `method: rlhf`: a built-in metric, the user's own Python function, or a trained reward model.

`rlhf.reward` in the config names one of:

    exact_match                       1.0 when the completion equals the row's reference (SQuAD-normalised)
    token_f1                          SQuAD token-overlap F1 between completion and reference (0..1)
    label_match                       1.0 when the completion names the reference and no other label (the
                                      label set: text+label rows' labels, else every distinct reference);
                                      the same reading of an answer as the label accuracy SFT reports
    package.module:function           a function importable from the Python path
    path/to/file.py:function          a function in a file (relative to the working directory)
    runs/my-reward                    a hone run directory trained with `method: reward`

A function is called as fn(prompt, completion, reference) once per completion and returns a number. `prompt`
is the prompt as the data gave it: a string for text prompts (and the `text` of text+label rows), or a list
of {"role", "content"} messages for chat prompts; `reference` is the row's reference, or None. This mirrors
TRL's reward functions, which see prompts in the dataset's own format.

`resolve_reward` checks the name before any model is loaded (so a typo fails in a second, not after the
model has loaded); `load_scorer` turns it into a batch scorer, loading the reward model if there is one.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hone.config import ConfigError
from hone.eval.metrics import exact_match, match_label, token_f1

BUILTINS: dict[str, Callable[[str, str], float]] = {"exact_match": exact_match, "token_f1": token_f1}
FORMS = ("'exact_match', 'token_f1', 'label_match', 'package.module:function', 'path/to/file.py:function', or "
         "a hone run directory trained with method: reward")


class RewardError(ConfigError):
    """A reward that cannot be used, phrased for the user (names rlhf.reward and what would fix it). A config
    error, so `hone train` reports it like any other bad setting (exit 2, no traceback)."""


@dataclass
class Reward:
    spec: str                      # rlhf.reward as the user wrote it
    kind: str                      # "builtin" | "function" | "model"
    needs_reference: bool          # built-ins compare with each row's reference
    metric: str                    # the held-out metric's name in the report
    fn: Callable | None = None     # (prompt, completion, reference) -> number, for built-ins and functions
    run_dir: Path | None = None    # for reward models


def resolve_reward(spec: str | None) -> Reward:
    """The reward named by rlhf.reward, checked without loading any model; RewardError if unusable."""
    if spec is None or not str(spec).strip():
        raise RewardError(f"method rlhf needs rlhf.reward: {FORMS}. For example --set rlhf.reward=exact_match "
                          "with a 'reference' in every data row.")
    spec = str(spec).strip()
    if spec in BUILTINS:
        metric = f"reward_{spec}"  # 0..1 scores: the report shows them as percentages
        return Reward(spec, "builtin", True, metric, fn=_builtin(BUILTINS[spec]))
    if spec == "label_match":  # the function needs the label set: load_scorer binds it
        return Reward(spec, "builtin", True, "reward_label_accuracy")
    path = Path(spec).expanduser()
    if path.is_dir():
        return Reward(spec, "model", False, "mean_reward", run_dir=_check_reward_run(path, spec))
    if ":" not in spec:
        raise RewardError(f"rlhf.reward '{spec}' is not a built-in reward, a directory, or module:function; "
                          f"use {FORMS}")
    where, name = spec.rsplit(":", 1)
    fn = _load_function(where, name, spec)
    return Reward(spec, "function", False, "mean_reward", fn=fn)


def _builtin(metric: Callable[[str, str], float]) -> Callable:
    def score(prompt, completion: str, reference: str | None) -> float:
        return metric(completion, reference or "")

    return score


def _check_reward_run(path: Path, spec: str) -> Path:
    import yaml

    config = path / "config.yaml"
    if not config.is_file():
        raise RewardError(f"rlhf.reward '{spec}' is a directory but not a hone run (no config.yaml); use {FORMS}")
    method = (yaml.safe_load(config.read_text()) or {}).get("method")
    if method != "reward":
        raise RewardError(f"rlhf.reward '{spec}' is a run trained with method '{method}', not 'reward': point it "
                          "at a run of `hone train` with method: reward")
    if not (path / "final").is_dir():
        raise RewardError(f"rlhf.reward '{spec}': the reward run has no final/ weights (did it finish? "
                          f"resume it with `hone train {config} --resume`)")
    return path


def _load_function(where: str, name: str, spec: str) -> Callable:
    """Import `name` from a module path or a .py file and check it takes (prompt, completion, reference)."""
    if where.endswith(".py") or "/" in where or "\\" in where:
        file = Path(where).expanduser()
        if not file.is_file():
            raise RewardError(f"rlhf.reward '{spec}': file {file} not found (relative paths are relative to the "
                              f"working directory, {Path.cwd()})")
        module_name = f"hone_user_reward_{abs(hash(str(file.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # dataclasses and pickling look modules up here
        _run_user_code(lambda: loader_spec.loader.exec_module(module), spec)
    else:
        try:
            module = _run_user_code(lambda: importlib.import_module(where), spec)
        except RewardError as e:
            if isinstance(e.__cause__, ModuleNotFoundError) and e.__cause__.name == where.split(".")[0]:
                raise RewardError(f"rlhf.reward '{spec}': no module named '{where}' on the Python path. For a file "
                                  f"in this folder write 'path/to/{where.replace('.', '/')}.py:{name}'.") from None
            raise
    fn = getattr(module, name, None)
    if fn is None:
        raise RewardError(f"rlhf.reward '{spec}': '{where}' has no '{name}'")
    if not callable(fn):
        raise RewardError(f"rlhf.reward '{spec}': '{name}' is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("prompt", "completion", "reference")
    except TypeError:
        raise RewardError(f"rlhf.reward '{spec}': {name}{_signature(fn)} cannot be called as "
                          f"{name}(prompt, completion, reference)") from None
    except ValueError:  # builtins without a signature: take them on trust, the first call will tell
        pass
    return fn


def _signature(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def _run_user_code(thunk, spec: str):
    try:
        return thunk()
    except Exception as e:
        raise RewardError(f"rlhf.reward '{spec}': importing it raised {type(e).__name__}: {e}") from e


# --- scoring ----------------------------------------------------------------------------------------


Scorer = Callable[[list, list[str], list], list[float]]  # (prompts, completions, references) -> rewards


def label_match(completion: str, reference: str | None, labels: list[str]) -> float:
    """1.0 when the completion names `reference` and no other label (hone.eval.metrics.match_label)."""
    return float(reference is not None and match_label(completion, labels) == reference)


def load_scorer(reward: Reward, labels: list[str] | None = None) -> Scorer:
    """A batch scorer for the reward; for a reward model this loads it (hone.methods.reward.load_scorer).
    `labels` is the label set label_match reads answers against."""
    if reward.kind == "model":
        from hone.methods import reward as reward_method

        model_scorer = reward_method.load_scorer(reward.run_dir)

        def score_with_model(prompts: list, completions: list[str], references: list) -> list[float]:
            return checked(model_scorer.score(prompts, completions), len(completions), reward.spec)

        return score_with_model
    fn = reward.fn
    if reward.spec == "label_match":
        if not labels:
            raise RewardError("rlhf.reward 'label_match' needs a label set: text+label rows, or references")
        fn = lambda prompt, completion, reference: label_match(completion, reference, labels)  # noqa: E731

    def score_with_function(prompts: list, completions: list[str], references: list) -> list[float]:
        values = []
        for prompt, completion, reference in zip(prompts, completions, references):
            try:
                values.append(fn(prompt, completion, reference))
            except Exception as e:
                raise RewardError(f"rlhf.reward '{reward.spec}' raised {type(e).__name__}: {e} (on completion "
                                  f"{completion[:80]!r})") from e
        return checked(values, len(completions), reward.spec)

    return score_with_function


def checked(values, n: int, spec: str) -> list[float]:
    """Rewards as floats; RewardError for a wrong count or a value that is not a finite number."""
    values = list(values)
    if len(values) != n:
        raise RewardError(f"rlhf.reward '{spec}' returned {len(values)} scores for {n} completions")
    out = []
    for v in values:
        if hasattr(v, "item"):  # a 0-d tensor or numpy scalar
            v = v.item()
        if not isinstance(v, (int, float)) or not math.isfinite(v):  # bools count as 0 / 1
            raise RewardError(f"rlhf.reward '{spec}' returned {v!r} ({type(v).__name__}); a reward must be a "
                              "finite number")
        out.append(float(v))
    return out
