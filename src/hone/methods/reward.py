"""Reward model: a scalar score head on the base model, trained with the Bradley-Terry loss on preference pairs.

    method: reward        # data: prompt/chosen/rejected pairs (any shape hone.methods.pairs reads)
    adapter: lora         # or full; the score head always trains (peft keeps `score` in modules_to_save)

The model is the base's transformer with a fresh linear head (hidden -> 1), built as the transformers
`...ForSequenceClassification` class with num_labels=1, so final/ loads with transformers and peft alone.
A pair's two sequences are prompt + answer through the chat template; the score is read at the answer's
LAST token, its end-of-turn token, so it sees the whole answer. We pick that position explicitly rather
than leaving it to transformers, which scores the rightmost token that is not the pad token: SmolLM2 pads
with its end-of-turn token, which would move the score one token early. (For users of the plain
transformers forward we also give the saved tokenizer and config a pad token distinct from end-of-turn;
with right padding, or left padding plus an attention mask, that forward gives the same score.)

    loss = -log sigmoid(r_chosen - r_rejected), summed over pairs (the loop divides by the pair count)

Evaluation is held-out pairwise accuracy (how often chosen outscores rejected; ties count half), before
(a fresh head: about chance) and after. `load_scorer(run_dir).score(prompts, completions)` reads a finished
run back as a batched, no-grad scorer; the rlhf method uses it as its reward.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hone.methods import Task, chunks, validate_method_data
from hone.methods.pairs import NEEDS, Pair, parse_pair, tokenize_pair
from hone.records import Message

# peft's SEQ_CLS task adds "score" (and "classifier") to modules_to_save: the fresh head trains in full and
# is saved beside the adapter.
PEFT_TASK = "SEQ_CLS"
# qlora is left out until the base can be loaded in 4 bits here (load() builds the model itself).
SUPPORTED_WEIGHTS = ("lora", "dora", "ia3", "full")
# Pairs whose sequences are sorted by length together, so a batch pads little (then batches are shuffled).
SORT_WINDOW = 64
# Held-out pairs the loop's validation loss runs on (every eval_every steps); the report uses them all.
VALIDATION_LOSS_PAIRS = 64


# --- the loss: a pure function of the two score vectors ------------------------------------------------


def bradley_terry_loss_sum(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Sum over pairs of -log sigmoid(chosen - rejected), and stat sums: accuracy (ties count half),
    margin, chosen_score, rejected_score. Computed in float32 (logsigmoid is stable for any margin)."""
    chosen, rejected = chosen.float(), rejected.float()
    margin = chosen - rejected
    loss = -F.logsigmoid(margin).sum()
    with torch.no_grad():
        right = (margin > 0).float() + 0.5 * (margin == 0).float()
        stats = {"accuracy": right.sum(), "margin": margin.sum(), "chosen_score": chosen.sum(),
                 "rejected_score": rejected.sum()}
    return loss, stats


# --- batches and scores ---------------------------------------------------------------------------------
#
# A pair's two sequences share their prompt, and in rlhf several completions share one. So a batch runs each
# distinct prompt once, keeps its keys and values, and runs every answer on top of its prompt's cache: about
# a third fewer tokens than two full sequences per pair on hh-rlhf (prompts are longer than answers).


@dataclass
class ScoreBatch:
    prompt_ids: torch.Tensor    # [prompts, Lp] right padded
    prompt_mask: torch.Tensor   # [prompts, Lp] 1 on real tokens
    answer_ids: torch.Tensor    # [answers, La] right padded; for training, the chosen rows then the rejected
    answer_mask: torch.Tensor   # [answers, La]
    answer_prompt: torch.Tensor  # [answers] the prompt row each answer continues
    target_weight: float        # pairs in the batch (the loss is a sum over pairs)
    real_tokens: int


def _padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def collate_scored(prompts: list[list[int]], answers: list[list[int]], answer_prompt: list[int], pad_id: int,
                   target_weight: float = 0.0) -> ScoreBatch:
    """Prompts and answers right padded (with a causal model, pads after a token cannot change it)."""
    prompt_ids, prompt_mask = _padded(prompts, pad_id)
    answer_ids, answer_mask = _padded(answers, pad_id)
    return ScoreBatch(prompt_ids, prompt_mask, answer_ids, answer_mask, torch.tensor(answer_prompt),
                      target_weight, sum(map(len, prompts)) + sum(map(len, answers)))


def sequence_scores(model, batch: ScoreBatch) -> torch.Tensor:
    """One score per answer, read at its last real token (the head is applied only there)."""
    from hone.methods.sft import unwrap

    classifier = unwrap(model)
    backbone = getattr(classifier, classifier.base_model_prefix)
    # Prompts: plain causal attention (their right pads are never attended to by real prompt tokens).
    cache = backbone(input_ids=batch.prompt_ids, use_cache=True).past_key_values
    cache.batch_select_indices(batch.answer_prompt)
    # Answers: continue each prompt right after its last real token, hiding the prompt's pads.
    mask = torch.cat([batch.prompt_mask[batch.answer_prompt], batch.answer_mask], dim=1)
    start = batch.prompt_mask.sum(1)[batch.answer_prompt]
    positions = start[:, None] + torch.arange(batch.answer_ids.shape[1], device=start.device)
    hidden = backbone(input_ids=batch.answer_ids, attention_mask=mask, position_ids=positions,
                      past_key_values=cache, use_cache=True).last_hidden_state
    last = batch.answer_mask.sum(1) - 1
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return classifier.score(picked).squeeze(-1)


def pair_loss_sum(model, batch: ScoreBatch) -> tuple[torch.Tensor, dict]:
    scores = sequence_scores(model, batch)
    n = scores.shape[0] // 2
    return bradley_terry_loss_sum(scores[:n], scores[n:])


def score_all(model, items: list[tuple[list[int], list[int]]], pad_id: int, *, batch_size: int,
              bf16: bool) -> list[float]:
    """Scores of many (prompt ids, answer ids), no grad, `batch_size` answers a batch, batched by length (a
    prompt shared by several answers runs once per batch); returned in the input order."""
    from hone.methods import batch_to
    from hone.train.device import autocast

    device = next(model.parameters()).device
    # a prompt's answers side by side, so its cache is shared; prompts by length, so batches pad little
    order = sorted(range(len(items)), key=lambda i: (len(items[i][0]), items[i][0], len(items[i][1])))
    out = [0.0] * len(items)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for group in chunks(order, batch_size):
            prompts: dict[tuple, int] = {}
            for i in group:
                prompts.setdefault(tuple(items[i][0]), len(prompts))
            batch = collate_scored([list(p) for p in prompts], [items[i][1] for i in group],
                                   [prompts[tuple(items[i][0])] for i in group], pad_id)
            with autocast(device, bf16):
                scores = sequence_scores(model, batch_to(batch, device)).float().tolist()
            for i, s in zip(group, scores):
                out[i] = s
    model.train(was_training)
    return out


# --- the model --------------------------------------------------------------------------------------------


def load(cfg):
    """The base model (anything model.base accepts) as a sequence classifier with one output."""
    return load_score_model(cfg.model.base, allow_download=cfg.model.allow_download,
                            trust_remote_code=cfg.model.trust_remote_code)


def load_score_model(base: str, *, allow_download: bool = False, trust_remote_code: bool = False):
    """Load `base` as a causal LM (embedded, HF dir, .gguf, run dir, hub) and move its transformer under a
    fresh score head, so every base hone accepts works the same way. A run's LoRA is merged first."""
    from hone.models.load import Loaded, ModelError, load_model

    loaded = load_model(base, allow_download=allow_download, trust_remote_code=trust_remote_code)
    causal = loaded.model
    if hasattr(causal, "merge_and_unload"):
        causal = causal.merge_and_unload()
    try:
        model = score_model_from(causal)
    except (ValueError, KeyError, AttributeError) as e:
        raise ModelError(f"model '{base}' ({type(causal).__name__}) has no sequence-classification form in "
                         f"transformers, so it cannot carry a reward head: {e}") from None
    set_distinct_pad(loaded.tokenizer, model.config)
    model.eval()
    return Loaded(model, loaded.tokenizer, description=f"reward head on {loaded.description}")


def score_model_from(causal) -> torch.nn.Module:
    """A ...ForSequenceClassification (num_labels=1) sharing `causal`'s transformer; the LM head is dropped.

    The shell is built on the meta device (no memory, no init time) and given the causal model's own
    transformer, so nothing is copied. The head starts as transformers initialises it (normal, std =
    initializer_range), drawn from the run's seeded RNG.
    """
    from transformers import AutoModelForSequenceClassification

    config = copy.deepcopy(causal.config)
    config.num_labels = 1
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    config = model.config
    prefix = model.base_model_prefix
    setattr(model, prefix, getattr(causal, causal.base_model_prefix))
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        raise AttributeError(f"{type(model).__name__} names its head differently from 'score'")
    shell = model.score
    dtype = next(getattr(model, prefix).parameters()).dtype
    model.score = torch.nn.Linear(shell.in_features, 1, bias=shell.bias is not None, dtype=dtype)
    torch.nn.init.normal_(model.score.weight, std=getattr(config, "initializer_range", 0.02))
    if model.score.bias is not None:
        torch.nn.init.zeros_(model.score.bias)
    config.architectures = [type(model).__name__]
    return model


def set_distinct_pad(tokenizer, config) -> None:
    """Give tokenizer and config a pad token that is not the end-of-turn token (see the module docstring)."""
    from hone.data.template import ensure_chat_template, render_prompt
    from hone.methods.pairs import answer_ids

    ensure_chat_template(tokenizer)
    prompt = (Message("user", "hi"),)
    end_of_turn = answer_ids(tokenizer, prompt, "ok", len(render_prompt(tokenizer, list(prompt))))[-1]
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == end_of_turn:
        for candidate in (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token):
            if candidate is not None and tokenizer.convert_tokens_to_ids(candidate) != end_of_turn:
                tokenizer.pad_token = candidate
                break
    config.pad_token_id = tokenizer.pad_token_id


# --- a finished run as a scorer -------------------------------------------------------------------------


def scored_ids(tokenizer, prompt: tuple[Message, ...], answer: str, max_prompt_tokens: int,
               max_seq_len: int) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids), cut exactly as tokenize_pair cuts a pair (so scoring sees what training saw)."""
    from hone.data.template import render_prompt
    from hone.methods.pairs import answer_ids

    prompt_ids = render_prompt(tokenizer, list(prompt))
    answer = answer_ids(tokenizer, prompt, answer, len(prompt_ids))
    prompt_ids = prompt_ids[-max_prompt_tokens:]
    return prompt_ids, answer[:max(1, max_seq_len - len(prompt_ids))]


def as_messages(prompt) -> tuple[Message, ...]:
    """A prompt as messages: text (one user turn), or a list of Message / {"role", "content"} dicts."""
    if isinstance(prompt, str):
        return (Message("user", prompt),)
    return tuple(m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in prompt)


@dataclass
class Scorer:
    """A trained reward model. `score(prompts, completions)` -> one float per (prompt, completion)."""

    model: torch.nn.Module
    tokenizer: object
    max_prompt_tokens: int
    max_seq_len: int
    bf16: bool = False
    batch_size: int = 16

    def score(self, prompts: list, completions: list[str]) -> list[float]:
        """prompts: texts (one user turn each) or message lists; completions: the assistant answers' text
        (rendered through the chat template, end-of-turn included, as in training)."""
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        items = [scored_ids(self.tokenizer, as_messages(p), c, self.max_prompt_tokens, self.max_seq_len)
                 for p, c in zip(prompts, completions)]
        return score_all(self.model, items, self.tokenizer.pad_token_id, batch_size=self.batch_size,
                         bf16=self.bf16)


def load_scorer(run_dir: str | Path, *, device: str | torch.device | None = None,
                precision: str | None = None, batch_size: int = 16) -> Scorer:
    """A finished `method: reward` run as a Scorer: its base from config.yaml, its head and adapter (or full
    weights) from final/. precision: 'bf16' / 'fp32' / 'auto' (default: the run's train.precision)."""
    import yaml

    from hone.config import parse_config
    from hone.models.load import ModelError
    from hone.train.device import pick_device, use_bf16

    run = Path(run_dir)
    if not (run / "config.yaml").is_file():
        raise ModelError(f"{run}: not a hone run directory (no config.yaml)")
    cfg = parse_config(yaml.safe_load((run / "config.yaml").read_text()), source=str(run / "config.yaml"))
    if cfg.objective != "reward":
        raise ModelError(f"{run} is a '{cfg.method}' run, not a reward model (method: reward)")
    final = run / "final"
    if not final.is_dir():
        raise ModelError(f"{run}: no final/ weights; did the run finish? (resume it with --resume)")
    with torch.random.fork_rng(devices=[]):  # the head's throwaway init must not move the caller's RNG
        model, tokenizer = load_trained(final, cfg)
    device = torch.device(device) if device is not None else pick_device()
    model.to(device).eval()
    return Scorer(model, tokenizer, cfg.preference.max_prompt_tokens, cfg.data.max_seq_len,
                  bf16=use_bf16(device, precision or cfg.train.precision), batch_size=batch_size)


def load_trained(final: Path, cfg):
    """(model, tokenizer) from final/: an adapter + head over the run's base, or a full model directory."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base = load(cfg).model
        base.config.pad_token_id = tokenizer.pad_token_id
        return PeftModel.from_pretrained(base, final, is_trainable=False), tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(final, dtype=torch.float32, use_safetensors=True)
    return model, tokenizer



# --- the method: data, batches, evaluation ---------------------------------------------------------------


def validate(cfg):
    """Preference pairs, line-checked before any model loads."""
    from hone.config import ConfigError

    if cfg.weights not in SUPPORTED_WEIGHTS:
        why = ("its virtual tokens sit outside the prompt and answer passes the score is read from"
               if cfg.weights in ("prefix", "prompt") else "a 4-bit base is not built for the reward head yet")
        raise ConfigError(f"method 'reward' trains with adapter {' / '.join(SUPPORTED_WEIGHTS)}, not "
                          f"'{cfg.weights}': {why}")
    return validate_method_data(cfg, parse_pair, NEEDS, key=Pair.key)


def build(cfg, data, model, tokenizer, run_dir: Path, log) -> Task:
    from hone.data.validate import write_rejects
    from hone.train.device import pick_device, use_bf16

    limits = (cfg.preference.max_prompt_tokens, cfg.data.max_seq_len)
    train = [tokenize_pair(tokenizer, p, *limits) for p in data.train]
    held = [tokenize_pair(tokenizer, p, *limits) for p in data.held_out]
    if data.problems:
        write_rejects(run_dir / "rejects.jsonl", data.problems)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    budget = cfg.train.batch_tokens

    def epoch_plan(epoch: int) -> list[list[int]]:
        rng = random.Random(f"{cfg.train.seed}:{epoch}")
        order = list(range(len(train)))
        rng.shuffle(order)
        batches = []
        for window in chunks(order, SORT_WINDOW):
            batches += pack_pairs(sorted(window, key=lambda i: pair_length(train[i])), train, budget)
        rng.shuffle(batches)
        return batches

    bf16 = use_bf16(pick_device(), cfg.train.precision)
    held_batches = pack_pairs(sorted(range(len(held)), key=lambda i: pair_length(held[i])), held, budget)
    # The loop's validation loss (a trend, repeated eval_every steps) runs on a fixed subset; the report's
    # before/after accuracy on every held-out pair.
    loss_pairs = sorted(range(min(len(held), VALIDATION_LOSS_PAIRS)), key=lambda i: pair_length(held[i]))
    stats = {"train_examples": len(train), "validation_examples": len(held),
             "validation_source": data.held_out_source,
             "train_tokens": sum(len(t.prompt_ids) + len(t.chosen_ids) + len(t.rejected_ids) for t in train),
             "truncated": sum(t.truncated for t in train + held), "rejected": len(data.problems)}
    return Task(epoch_plan=epoch_plan, collate=lambda spec: collate_pairs(train, spec, pad_id),
                loss_sum=pair_loss_sum,
                held_out=[collate_pairs(held, spec, pad_id) for spec in pack_pairs(loss_pairs, held, budget)],
                tokens_per_epoch=stats["train_tokens"], token_loss=False,
                evaluate=pairwise_evaluator(data.held_out, held, held_batches, pad_id, bf16), stats=stats)


def pair_length(t) -> tuple[int, int]:
    """(prompt tokens, longer answer's tokens)."""
    return len(t.prompt_ids), max(len(t.chosen_ids), len(t.rejected_ids))


def pack_pairs(order: list[int], pairs: list, budget: int) -> list[list[int]]:
    """Consecutive pairs per batch while the padded batch (one prompt row and two answer rows per pair)
    stays within `budget` tokens; a pair longer than the budget gets a batch of its own."""
    batches, current, width = [], [], (0, 0)
    for i in order:
        p, a = pair_length(pairs[i])
        w = (max(width[0], p), max(width[1], a))
        if current and (len(current) + 1) * (w[0] + 2 * w[1]) > budget:
            batches.append(current)
            current, w = [], (p, a)
        current.append(i)
        width = w
    if current:
        batches.append(current)
    return batches


def collate_pairs(pairs: list, spec: list[int], pad_id: int) -> ScoreBatch:
    """One prompt row per pair; the chosen answers, then the rejected ones, each continuing its prompt."""
    answers = [pairs[i].chosen_ids for i in spec] + [pairs[i].rejected_ids for i in spec]
    return collate_scored([pairs[i].prompt_ids for i in spec], answers, [*range(len(spec))] * 2, pad_id,
                          target_weight=len(spec))


def pairwise_evaluator(records: list[Pair], held: list, batches: list[list[int]], pad_id: int, bf16: bool):
    """Held-out pairwise accuracy: the share of pairs whose chosen answer outscores the rejected one."""
    from hone.methods import batch_to
    from hone.train.device import autocast

    def evaluate(model) -> dict:
        device = next(model.parameters()).device
        chosen, rejected = torch.zeros(len(held)), torch.zeros(len(held))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for spec in batches:
                with autocast(device, bf16):
                    scores = sequence_scores(model, batch_to(collate_pairs(held, spec, pad_id), device)).float().cpu()
                chosen[spec], rejected[spec] = scores[:len(spec)], scores[len(spec):]
        model.train(was_training)
        _, sums = bradley_terry_loss_sum(chosen, rejected)
        n = max(1, len(held))
        metrics = {"pairwise_accuracy": float(sums["accuracy"]) / n, "mean_margin": float(sums["margin"]) / n,
                   "mean_chosen_score": float(sums["chosen_score"]) / n,
                   "mean_rejected_score": float(sums["rejected_score"]) / n}
        examples = [{"prompt": _clip(r.prompt[-1].content), "reference": _clip(r.chosen),
                     "output": f"chosen {c:+.3f} vs rejected {j:+.3f}"}
                    for r, c, j in zip(records, chosen.tolist(), rejected.tolist())]
        return {"task": "pairwise preference (held-out pairs)", "n": len(held), "metrics": metrics,
                "primary": "pairwise_accuracy", "examples": examples}

    return evaluate


def _clip(text: str, n: int = 160) -> str:
    return text if len(text) <= n else text[:n] + "…"
