"""Preference tuning on chosen/rejected pairs: `dpo`, and the reference-free `orpo` and `simpo`.

    method: dpo       -log sigmoid(beta x [(log pi - log ref)(chosen) - (log pi - log ref)(rejected)])
    method: simpo     -log sigmoid(b x mean log pi(chosen) - b x mean log pi(rejected) - gamma)
    method: orpo      NLL(chosen, per token) + lambda x -log sigmoid(log odds(chosen) - log odds(rejected))

A micro-batch holds whole pairs: the chosen and rejected sequences (prompt + answer) of every pair in it go
through ONE forward pass, right-padded to the batch's longest. A sequence's log-prob is the sum over its
answer tokens only, and the LM head is applied only at the positions that predict an answer token (as in
sft.py), so the hidden x vocabulary matmul never runs over prompts or padding.

DPO's reference is the starting model. With an adapter it is the same model with the adapter disabled
(peft's `disable_adapter()`), never a second copy; with `adapter: full` the policy's own weights move, so a
frozen copy is kept, unless the reference log-probs are precomputed (the default): then they are computed
once, before the first step, for every train and held-out pair, and cached in run_dir so a resumed run reloads
them instead of recomputing them from weights that have since moved.

The loss is a SUM over pairs; the loop divides by the number of pairs in the optimizer step.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hone.methods import Task, batch_to, validate_method_data
from hone.methods.pairs import NEEDS, Pair, TokenizedPair, parse_pair, tokenize_pair
from hone.methods.sft import unwrap

IGNORE = -100
REFERENCE_FILE = "reference_logps.safetensors"
BUCKET = 64  # pairs sorted by length together when an epoch is planned


# --- losses: pure tensor functions over per-pair log-probs (B,) ------------------------------------------


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """Per-pair DPO loss (sigmoid; with label_smoothing > 0, conservative DPO), and the implicit rewards
    beta x (policy - reference) log-prob of each answer. Log-probs are sums over answer tokens."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    # cDPO: the label is right with probability 1 - eps, so the target is a mixture of both directions.
    losses = -(1 - label_smoothing) * F.logsigmoid(margin) - label_smoothing * F.logsigmoid(-margin)
    return losses, chosen_reward.detach(), rejected_reward.detach()


def simpo_loss(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, beta: float, gamma: float):
    """Per-pair SimPO loss over MEAN per-token log-probs; reward = beta x mean log-prob, margin gamma."""
    chosen_reward, rejected_reward = beta * mean_chosen, beta * mean_rejected
    losses = -F.logsigmoid(chosen_reward - rejected_reward - gamma)
    return losses, chosen_reward.detach(), rejected_reward.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 and far below it (Maechler's two branches)."""
    # Clamped below 0 so neither branch is infinite: torch.where would turn an inf into a NaN gradient.
    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(mean_chosen: torch.Tensor, mean_rejected: torch.Tensor, lam: float):
    """Per-pair ORPO loss: the chosen answer's NLL per token plus lam x the odds-ratio loss, where
    odds(y) = P(y) / (1 - P(y)) with P(y) the geometric mean token probability exp(mean log-prob).
    The 'rewards' are each answer's log-odds; their difference is the log odds ratio."""
    chosen_log_odds = mean_chosen - log1mexp(mean_chosen)
    rejected_log_odds = mean_rejected - log1mexp(mean_rejected)
    ratio_loss = -F.logsigmoid(chosen_log_odds - rejected_log_odds)
    return -mean_chosen + lam * ratio_loss, chosen_log_odds.detach(), rejected_log_odds.detach()


def reward_stats(chosen_reward: torch.Tensor, rejected_reward: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the batch (the loop divides by the number of pairs): accuracy counts chosen > rejected."""
    return {"reward_accuracy": (chosen_reward > rejected_reward).float().sum(),
            "reward_margin": (chosen_reward - rejected_reward).sum(),
            "reward_chosen": chosen_reward.sum(), "reward_rejected": rejected_reward.sum()}


# --- batches ---------------------------------------------------------------------------------------------


@dataclass
class PairBatch:
    input_ids: torch.Tensor   # (2B, T): the B chosen sequences, then the B rejected ones; right-padded
    labels: torch.Tensor      # (2B, T): at position t the answer token t+1 (what t predicts), else -100
    pair_index: torch.Tensor  # (B,): each pair's index in train + held-out order (the reference cache's rows)
    target_weight: int        # pairs
    real_tokens: int          # non-pad tokens

    @property
    def pairs(self) -> int:
        return self.pair_index.numel()


def pair_length(p: TokenizedPair) -> int:
    return len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))


def pair_tokens(p: TokenizedPair) -> int:
    return 2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)


def group_pairs(indices: list[int], pairs: list[TokenizedPair], batch_tokens: int) -> list[list[int]]:
    """Consecutive pairs per micro-batch while 2 x pairs x longest sequence fits batch_tokens (at least one)."""
    groups, current, longest = [], [], 0
    for i in indices:
        n = pair_length(pairs[i])
        if current and 2 * (len(current) + 1) * max(longest, n) > batch_tokens:
            groups.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    return groups + [current] if current else groups


def by_length(indices: list[int], pairs: list[TokenizedPair]) -> list[int]:
    return sorted(indices, key=lambda i: pair_length(pairs[i]))


def shuffled_groups(n: int, pairs: list[TokenizedPair], batch_tokens: int, seed: int) -> list[list[int]]:
    """One epoch's micro-batches: a seeded shuffle, sorted by length within windows of BUCKET pairs (so a
    batch's sequences are alike in length and padding stays small), then the batches shuffled."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    groups = []
    for start in range(0, n, BUCKET):
        groups += group_pairs(by_length(order[start:start + BUCKET], pairs), pairs, batch_tokens)
    rng.shuffle(groups)
    return groups


def collate_pairs(pairs: list[TokenizedPair], indices: list[int], pad_id: int) -> PairBatch:
    seqs = ([(pairs[i].prompt_ids, pairs[i].chosen_ids) for i in indices]
            + [(pairs[i].prompt_ids, pairs[i].rejected_ids) for i in indices])
    width = max(len(p) + len(a) for p, a in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for row, (prompt, answer) in enumerate(seqs):
        ids = prompt + answer
        input_ids[row, :len(ids)] = torch.tensor(ids)
        # Position t predicts token t+1: the answer's tokens are predicted from len(prompt)-1 onwards.
        labels[row, len(prompt) - 1:len(ids) - 1] = torch.tensor(answer)
    return PairBatch(input_ids, labels, torch.tensor(indices, dtype=torch.long), len(indices),
                     sum(len(p) + len(a) for p, a in seqs))


def sequence_logps(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of answer-token log-probs, answer length) per sequence, shape (2B,) each.

    Right padding needs no attention mask: causal attention never lets a real token see the pads after it.
    """
    base = unwrap(model)
    hidden = base.get_decoder()(input_ids=batch.input_ids, use_cache=False).last_hidden_state
    mask = batch.labels != IGNORE
    logits = base.get_output_embeddings()(hidden[mask]).float()
    token_logps = -F.cross_entropy(logits, batch.labels[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    sums = torch.zeros(mask.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), mask.sum(1)


# --- the reference (dpo) -------------------------------------------------------------------------------


class Reference:
    """The reference model's per-pair log-probs: from the cache when precomputed, else live under no_grad
    with the adapter disabled (or from a frozen copy for full fine-tuning)."""

    def __init__(self):
        self.cache: torch.Tensor | None = None  # (pairs, 2): chosen, rejected
        self.frozen = None                      # a frozen copy, only for adapter: full without precompute
        self.ready = False                      # False before training: the policy IS the reference then
        # (pair indices, (n, 2) log-probs) the base evaluation measured: the starting model on the held-out
        # pairs, i.e. their reference log-probs, so precomputing does not score them a second time.
        self.seen: tuple[torch.Tensor, torch.Tensor] | None = None

    def logps(self, model, batch: PairBatch) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[batch.pair_index]
        if self.frozen is not None:
            return reference_logps(self.frozen, batch)
        with starting_weights(model) as ref:
            return reference_logps(ref, batch)


def reference_logps(ref_model, batch: PairBatch) -> torch.Tensor:
    """(B, 2) chosen/rejected answer log-probs, without a graph."""
    with torch.no_grad():
        logps, _ = sequence_logps(ref_model, batch)
    return torch.stack(logps.float().chunk(2), dim=1)


@contextlib.contextmanager
def starting_weights(model):
    """The model as it started: a peft model with its adapter disabled. A model without an adapter is
    returned as it is, which is only the starting model before its first update (before_training)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


class PreferenceLoss:
    """loss_sum(model, batch) -> (summed loss, summed stats) for one objective."""

    def __init__(self, objective: str, cfg, reference: Reference):
        self.objective, self.p, self.reference = objective, cfg.preference, reference

    def __call__(self, model, batch: PairBatch):
        logps, lengths = sequence_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        if self.objective == "dpo":
            ref = self.reference.logps(model, batch).to(chosen.dtype)
            losses, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.p.beta, self.p.label_smoothing)
            return losses.sum(), reward_stats(cr, rr)
        mean_chosen, mean_rejected = (logps / lengths).chunk(2)
        if self.objective == "simpo":
            losses, cr, rr = simpo_loss(mean_chosen, mean_rejected, self.p.simpo_beta, self.p.simpo_gamma)
            return losses.sum(), reward_stats(cr, rr)
        losses, cr, rr = orpo_loss(mean_chosen, mean_rejected, self.p.orpo_lambda)
        return losses.sum(), {**reward_stats(cr, rr), "nll": -mean_chosen.detach().sum()}


# --- the method: data, tokenisation, the task ------------------------------------------------------------


def validate(cfg):
    """Pairs from data.train (and data.validation), line-numbered problems; config clashes before any model."""
    from hone.config import ConfigError

    if cfg.weights in ("prefix", "prompt"):
        raise ConfigError(f"method {cfg.method} trains LoRA-family adapters (lora, dora, ia3, qlora) or full "
                         f"weights; adapter: {cfg.weights} changes the input rather than the weights, so the "
                         "reference cannot be the same model with it disabled. Pick another adapter.")
    if cfg.preference.max_prompt_tokens >= cfg.data.max_seq_len:
        raise ConfigError(f"preference.max_prompt_tokens ({cfg.preference.max_prompt_tokens}) must be below "
                         f"data.max_seq_len ({cfg.data.max_seq_len}) so the answers have room")
    return validate_method_data(cfg, parse_pair, NEEDS, key=Pair.key)


def tokenize_pairs(records: list[Pair], tokenizer, cfg, split: str, problems: list):
    """TokenizedPairs, honouring data.on_too_long (truncate / skip / error); returns (pairs, truncated)."""
    from hone.records import Problem

    out, truncated = [], 0
    for n, pair in enumerate(records, 1):
        tok = tokenize_pair(tokenizer, pair, cfg.preference.max_prompt_tokens, cfg.data.max_seq_len)
        if tok.truncated and cfg.data.on_too_long != "truncate":
            problems.append(Problem(split, n, "too_long", f"{split} pair #{n} is longer than data.max_seq_len="
                                    f"{cfg.data.max_seq_len} (or its prompt than preference.max_prompt_tokens="
                                    f"{cfg.preference.max_prompt_tokens})"))
            continue
        truncated += tok.truncated
        out.append(tok)
    return out, truncated


def tokenize_all(data, tokenizer, cfg, run_dir: Path):
    from hone.data.readers import DataError
    from hone.data.validate import write_rejects
    from hone.train.prepare import DataProblems

    problems = list(data.problems)
    train, t1 = tokenize_pairs(data.train, tokenizer, cfg, "train", problems)
    held, t2 = tokenize_pairs(data.held_out, tokenizer, cfg, "held-out", problems)
    too_long = [p for p in problems if p.code == "too_long"]
    if too_long and cfg.data.on_too_long == "error":
        raise DataProblems(too_long, f"Raise data.max_seq_len (now {cfg.data.max_seq_len}) or set "
                                     "data.on_too_long to truncate or skip.")
    if problems:
        write_rejects(run_dir / "rejects.jsonl", problems)
    if not train or not held:
        raise DataError(f"{cfg.data.train}: no {'train' if not train else 'held-out'} pair left after "
                         f"data.on_too_long={cfg.data.on_too_long}; see {run_dir / 'rejects.jsonl'}")
    stats = {"train_examples": len(train), "validation_examples": len(held),
             "validation_source": data.held_out_source, "train_tokens": sum(pair_tokens(p) for p in train),
             "truncated": t1 + t2, "skipped": len(too_long), "rejected": len(problems)}
    return train, held, stats


def build(cfg, data, model, tokenizer, run_dir: Path, log) -> Task:
    train, held, stats = tokenize_all(data, tokenizer, cfg, run_dir)
    pairs = train + held  # one index space: the reference cache has a row per pair, train first
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    held_ids = list(range(len(train), len(pairs)))
    held_batches = [collate_pairs(pairs, g, pad_id)
                    for g in group_pairs(by_length(held_ids, pairs), pairs, cfg.train.batch_tokens)]
    reference = Reference()
    objective = cfg.objective

    def epoch_plan(epoch: int) -> list[list[int]]:
        return shuffled_groups(len(train), pairs, cfg.train.batch_tokens, cfg.train.seed * 100_003 + epoch)

    def before_training(model) -> None:
        if objective == "dpo":
            prepare_reference(reference, model, pairs, pad_id, cfg, run_dir, log)

    return Task(epoch_plan=epoch_plan, collate=lambda spec: collate_pairs(pairs, spec, pad_id),
                loss_sum=PreferenceLoss(objective, cfg, reference), held_out=held_batches,
                tokens_per_epoch=sum(pair_tokens(p) for p in train),
                evaluate=lambda m: evaluate_pairs(m, held_batches, reference, cfg), stats=stats,
                before_training=before_training, token_loss=False,
                plot_stats=["reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"])


# --- reference preparation -------------------------------------------------------------------------------


def pairs_fingerprint(pairs: list[TokenizedPair]) -> str:
    h = hashlib.sha256()
    for p in pairs:
        h.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    return h.hexdigest()


def prepare_reference(reference: Reference, model, pairs: list[TokenizedPair], pad_id: int, cfg, run_dir: Path,
                      log) -> None:
    """Runs once the adapter is applied, before step 1 (and again on resume, before the checkpoint is
    loaded): the model's weights are still the starting ones, so it can serve as its own reference."""
    reference.ready = True
    if not cfg.preference.precompute_reference:
        if not hasattr(model, "disable_adapter"):
            # Full fine-tuning moves the weights themselves: keep the starting ones in a frozen copy.
            reference.frozen = copy.deepcopy(model).eval().requires_grad_(False)
            log.event("info", "dpo reference: a frozen copy of the starting model (adapter: full, "
                              "precompute_reference off), doubling model memory")
        return
    from safetensors.torch import load_file, safe_open, save_file

    path, fingerprint = run_dir / REFERENCE_FILE, pairs_fingerprint(pairs)
    if path.is_file():
        with safe_open(str(path), "pt") as f:
            same = (f.metadata() or {}).get("pairs_sha256") == fingerprint
        if same:
            tensors = load_file(str(path))
            reference.cache = torch.stack([tensors["chosen"], tensors["rejected"]], 1).to(_device_of(model))
            log.event("info", f"dpo reference: reloaded log-probs of {len(pairs)} pairs from {path.name}")
            return
        log.event("warn", f"{path.name} was computed for other pairs; recomputing it")
    start = time.perf_counter()
    reference.cache = compute_reference(model, pairs, pad_id, cfg, reference.seen)
    cpu = reference.cache.cpu()
    tmp = path.with_suffix(".tmp")
    save_file({"chosen": cpu[:, 0].contiguous(), "rejected": cpu[:, 1].contiguous()}, str(tmp),
              metadata={"pairs_sha256": fingerprint})
    tmp.replace(path)
    log.event("info", f"dpo reference: log-probs of {len(pairs)} pairs computed in "
                      f"{time.perf_counter() - start:.0f}s and cached to {path.name}")


def compute_reference(model, pairs: list[TokenizedPair], pad_id: int, cfg, seen=None) -> torch.Tensor:
    """(pairs, 2) reference log-probs of every pair; rows in `seen` (from the base evaluation) are reused."""
    from hone.train.device import autocast, pick_device, use_bf16

    device = _device_of(model)
    bf16 = use_bf16(pick_device(), cfg.train.precision)  # the loop's precision, so step 1 starts at loss log 2
    out = torch.zeros(len(pairs), 2, device=device)
    todo = set(range(len(pairs)))
    if seen is not None:
        out[seen[0].to(device)] = seen[1].to(device)
        todo -= set(seen[0].tolist())
    was_training = model.training
    model.eval()
    for group in group_pairs(by_length(sorted(todo), pairs), pairs, cfg.train.batch_tokens):
        batch = batch_to(collate_pairs(pairs, group, pad_id), device)
        with autocast(device, bf16), starting_weights(model) as ref:
            out[batch.pair_index] = reference_logps(ref, batch)
    model.train(was_training)
    return out


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


# --- evaluation ------------------------------------------------------------------------------------------


def evaluate_pairs(model, batches: list[PairBatch], reference: Reference, cfg) -> dict:
    """Held-out preference figures, comparable between the starting model and the tuned one."""
    from hone.train.device import autocast, pick_device, use_bf16

    device = _device_of(model)
    bf16 = use_bf16(pick_device(), cfg.train.precision)
    was_training = model.training
    model.eval()
    sums, means, refs, index = [], [], [], []
    with torch.no_grad():
        for batch in batches:
            batch = batch_to(batch, device)
            with autocast(device, bf16):
                logps, lengths = sequence_logps(model, batch)
                if cfg.objective == "dpo" and reference.ready:
                    refs.append(reference.logps(model, batch).float().cpu())
            sums.append(torch.stack(logps.float().cpu().chunk(2), 1))
            index.append(batch.pair_index.cpu())
            means.append(torch.stack((logps.float() / lengths).cpu().chunk(2), 1))
    model.train(was_training)
    s, m = torch.cat(sums), torch.cat(means)
    metrics = preference_metrics(s, m)
    if cfg.objective == "dpo" and not reference.ready:
        reference.seen = (torch.cat(index), s)
    if cfg.objective == "dpo":
        # Before training the policy is the reference, so every implicit reward is 0 by construction.
        ref = torch.cat(refs) if refs else s
        rewards = cfg.preference.beta * (s - ref)
        metrics["implicit_reward_accuracy"] = float((rewards[:, 0] > rewards[:, 1]).float().mean())
        metrics["implicit_reward_margin"] = float((rewards[:, 0] - rewards[:, 1]).mean())
    return {"task": "preference pairs (held-out)", "n": len(s), "metrics": metrics,
            "primary": "preference_accuracy"}


def preference_metrics(sums: torch.Tensor, means: torch.Tensor) -> dict[str, float]:
    """From (pairs, 2) chosen/rejected answer log-probs: summed over tokens, and per token."""
    return {"preference_accuracy": float((sums[:, 0] > sums[:, 1]).float().mean()),
            "normalized_preference_accuracy": float((means[:, 0] > means[:, 1]).float().mean()),
            "logp_margin": float((sums[:, 0] - sums[:, 1]).mean()),
            "normalized_logp_margin": float((means[:, 0] - means[:, 1]).mean()),
            "chosen_logp": float(sums[:, 0].mean()), "rejected_logp": float(sums[:, 1].mean())}
