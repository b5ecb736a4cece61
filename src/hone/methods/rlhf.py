"""RLHF by GRPO: sample a group of answers per prompt, score them, and make the better-than-average ones likelier.

    method: rlhf
    rlhf: {reward: exact_match, group_size: 4, prompts_per_batch: 2, temperature: 1.0, kl_coef: 0.04}

Why GRPO (Group Relative Policy Optimization; Shao et al., "DeepSeekMath", arXiv:2402.03300, and TRL's
GRPOTrainer documentation) rather than PPO with a value head: PPO's advantage comes from a learned value
model, a second network as large as the policy that must be trained alongside it, held in memory and tuned
(GAE gamma/lambda, value-loss weight, value clipping). GRPO's baseline is simply the mean reward of the
other answers to the same prompt, so on a small GPU or a CPU only the policy (an adapter over the base) and
the reward are needed, and there are fewer knobs. Comparing answers to the same prompt also matches how
reward models are trained (on comparisons), so their scale and offset do not matter.

One step runs inside the loop's `loss_sum` (the one loop still owns optimisation, accumulation,
checkpoints, resume and logging):

1. rollout: under no_grad in eval mode, sample group_size completions per prompt at rlhf.temperature. The
   sampling draws on torch's RNG, which checkpoints save, so a resumed run samples the same completions.
2. score each completion; advantage = (reward - group mean) / (group std + eps) (std as torch.std, eps 1e-4).
3. with grad: per-token log-probs of each completion under the policy, at the same temperature; per token
   -(ratio x advantage) + kl_coef x KL, where ratio = pi / pi.detach() (= 1; it carries the policy gradient)
   and KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1 against the reference policy (the starting
   model: the base with the adapter disabled, or a frozen copy for full fine-tuning). There is one
   optimisation pass per rollout, so PPO's ratio clipping could never activate and is left out.
   Each completion's loss is the mean over its tokens (DeepSeekMath's 1/|o_i|); the batch's loss is the sum
   over completions and target_weight is the number of completions, so a step's loss is the mean over all
   its completions, whatever grad_accum is.

The logged `loss` is therefore about kl_coef x KL (advantages average to zero in each group); watch
`reward`, `reward_std`, `kl` and `completion_length` in metrics.jsonl instead.
"""

from __future__ import annotations

import copy
import random
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from hone.methods import MethodData, RowError, Task, chunks, text_field, validate_method_data
from hone.methods.rewards import Reward, load_scorer, resolve_reward
from hone.methods.pairs import chat_messages
from hone.records import Message

NEEDS = ("'prompt' (text or chat messages) or 'messages' (ending in a user turn, or in the reference answer), "
         "or 'text' + 'label'; plus 'reference' (or 'answer' / 'completion') when the reward compares with one")
REFERENCE_KEYS = ("reference", "answer", "completion")
STD_EPS = 1e-4


# --- data ---------------------------------------------------------------------------------------------


@dataclass
class PromptRow:
    messages: tuple[Message, ...]  # what the policy sees, up to its answer
    given: Any                     # the prompt as the reward function sees it: text, or message dicts
    reference: str | None
    label: str | None = None       # text+label rows: the label (also the reference)
    shape: str = "prompt"

    def key(self) -> str:
        """Content identity, for the deterministic held-out split."""
        return repr((tuple((m.role, m.content) for m in self.messages), self.reference))


def parse_prompt_row(row: dict, needs_reference: bool = False) -> PromptRow:
    """One data row -> PromptRow, or RowError saying what is missing or malformed."""
    if row.get("prompt") is not None:
        if isinstance(row["prompt"], str):
            text = text_field(row, "prompt")
            messages, given = [Message("user", text)], text
        else:
            messages = chat_messages(row["prompt"], "prompt")
            given = _as_dicts(messages)
        reference, label, shape = _reference(row), None, "prompt"
    elif row.get("messages") is not None:
        messages = chat_messages(row["messages"], "messages")
        answer = None
        if messages[-1].role == "assistant":
            messages, answer = messages[:-1], messages[-1].content
        reference, label, given, shape = _reference(row) or answer, None, _as_dicts(messages), "messages"
    elif row.get("text") is not None and row.get("label") is not None:
        text = text_field(row, "text")
        label = str(row["label"]).strip() if isinstance(row["label"], (str, int)) else None
        if not label:
            raise RowError("bad_type", "'label' must be a non-empty string or an integer")
        messages, given, reference, shape = [Message("user", text)], text, label, "label"
    else:
        raise RowError("missing_field", f"no prompt: missing 'prompt' or 'messages' (or 'text' and 'label') "
                                        f"(keys found: {', '.join(sorted(row)) or 'none'})")
    if not messages or messages[-1].role != "user":
        where = "'messages'" if shape == "messages" else "'prompt'"
        raise RowError("no_user_turn", f"{where} must end with a user message (the policy answers it), "
                                       f"or with the assistant's reference answer after one")
    if needs_reference and reference is None:
        raise RowError("missing_field", "no reference to score completions against: the reward compares each "
                                        "completion with the row's 'reference' (or 'answer' / 'completion')")
    return PromptRow(tuple(messages), given, reference, label, shape)


def _as_dicts(messages: list[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def reward_prompts(rows: list[PromptRow], reward: Reward) -> list:
    """What the reward sees as each prompt: a reward model gets the whole conversation the policy saw (the
    system instruction of label rows included), as it was trained on conversations; a function gets the
    prompt as the data gave it."""
    if reward.kind == "model":
        return [_as_dicts(list(r.messages)) for r in rows]
    return [r.given for r in rows]


def _reference(row: dict) -> str | None:
    if any(row.get(k) is not None for k in REFERENCE_KEYS):
        return text_field(row, *REFERENCE_KEYS)
    return None


def validate(cfg) -> MethodData:
    """Check the reward and the data before any model loads."""
    from hone.config import ConfigError

    reward = resolve_reward(cfg.rlhf.reward)
    if cfg.data.max_seq_len < cfg.rlhf.max_new_tokens + 8:
        raise ConfigError(f"data.max_seq_len ({cfg.data.max_seq_len}) leaves no room for a prompt beside "
                          f"rlhf.max_new_tokens ({cfg.rlhf.max_new_tokens}); raise it or lower max_new_tokens")
    data = validate_method_data(cfg, partial(parse_prompt_row, needs_reference=reward.needs_reference), NEEDS,
                                key=PromptRow.key)
    data.shapes = dict(Counter(r.shape for r in data.train))
    data.labels = sorted({r.label for r in data.train if r.label is not None})
    if data.labels:
        # Text+label rows get the same system instruction (with the label list) that SFT trains with.
        system = Message("system", cfg.data.instruction.replace("{labels}", ", ".join(data.labels)))
        data.train = [_with_system(r, system) for r in data.train]
        data.held_out = [_with_system(r, system) for r in data.held_out]
    return data


def _with_system(row: PromptRow, system: Message) -> PromptRow:
    if row.shape != "label":
        return row
    return PromptRow((system, *row.messages), row.given, row.reference, row.label, row.shape)


# --- the loss: pure tensor functions ------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = STD_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage per completion, std of each group). Completions of one prompt are consecutive.

    advantage = (reward - group mean) / (group std + eps), the std unbiased (torch.std) as in TRL.
    """
    groups = rewards.view(-1, group_size).float()
    std = groups.std(dim=1, keepdim=True)
    return ((groups - groups.mean(dim=1, keepdim=True)) / (std + eps)).view(-1), std.view(-1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate k3 = exp(ref - logp) - (ref - logp) - 1 (Schulman's
    low-variance, always non-negative estimator, as used by GRPO)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss_sum(logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
                  mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(sum over completions of each completion's mean per-token loss, each completion's mean KL or None).

    logp / ref_logp / mask: [completions, tokens]; advantages: [completions]. Per token the loss is
    -(pi/pi.detach()) x advantage + kl_coef x k3: its value is -advantage + kl_coef x k3 and its gradient is
    -advantage x grad log pi plus the KL's. Padding (mask 0) is zeroed with `where` before any arithmetic,
    so a NaN or inf there reaches neither the sum nor the gradient.
    """
    keep = mask.bool()
    logp = torch.where(keep, logp, 0.0)
    per_token = -torch.exp(logp - logp.detach()) * advantages[:, None]
    kl = None
    if ref_logp is not None:
        kl_token = torch.where(keep, k3_kl(logp, torch.where(keep, ref_logp, 0.0)), 0.0)
        per_token = per_token + kl_coef * kl_token
    lengths = keep.sum(dim=1).clamp(min=1)
    per_completion = torch.where(keep, per_token, 0.0).sum(dim=1) / lengths
    if ref_logp is not None:
        kl = (kl_token.sum(dim=1) / lengths).detach()
    return per_completion.sum(), kl


# --- rollouts ---------------------------------------------------------------------------------------


@dataclass
class RolloutBatch:
    prompts: torch.Tensor  # indices into the task's training prompts
    target_weight: float   # completions in the batch (the loss is a sum over them)
    real_tokens: int       # prompt tokens x group_size; the rollout adds the completions' tokens


@dataclass
class Rollout:
    sequences: torch.Tensor       # [completions, prompt_width + new]: left-padded prompt, then the completion
    attention_mask: torch.Tensor  # 1 on prompt tokens and on completion tokens through the first stop token
    prompt_width: int

    @property
    def completion(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_width:]

    @property
    def completion_mask(self) -> torch.Tensor:
        return self.attention_mask[:, self.prompt_width:]


def through_first_stop(tokens: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """1 on each row's tokens up to and including its first stop token, 0 after (generate pads after it)."""
    is_stop = torch.isin(tokens, torch.tensor(stops, device=tokens.device)).long()
    after = (is_stop.cumsum(dim=1) - is_stop) > 0
    return (~after).long()


def sample_completions(model, prompt_ids: list[list[int]], *, group_size: int, max_new_tokens: int,
                       temperature: float, pad_id: int, stops: list[int]) -> Rollout:
    """group_size samples per prompt (consecutive rows), from the policy's own distribution at `temperature`
    (no top-k / top-p, so the samples are on-policy for the log-probs the loss uses)."""
    device = next(model.parameters()).device
    rows = [ids for ids in prompt_ids for _ in range(group_size)]
    width = max(len(ids) for ids in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             eos_token_id=stops, pad_token_id=pad_id)
    model.train(was_training)
    completion_mask = through_first_stop(out[:, width:], stops)
    return Rollout(out, torch.cat([mask.to(device), completion_mask], dim=1), width)


def completion_logps(model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """[completions, new tokens] log-probs of each sampled token at `temperature` (padding positions too;
    callers mask them). Only the completion's logits are computed (logits_to_keep)."""
    new = rollout.sequences.shape[1] - rollout.prompt_width
    positions = (rollout.attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: count real tokens
    out = model(input_ids=rollout.sequences, attention_mask=rollout.attention_mask, position_ids=positions,
                use_cache=False, logits_to_keep=new + 1)
    logits = out.logits[:, -(new + 1):-1].float() / temperature
    targets = rollout.completion
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return -ce.view(targets.shape)


def reference_logps(model, frozen, rollout: Rollout, temperature: float) -> torch.Tensor:
    """Log-probs under the starting policy: a frozen copy if there is one, else the adapter switched off."""
    with torch.no_grad():
        if frozen is not None:
            return completion_logps(frozen, rollout, temperature)
        with model.disable_adapter():
            return completion_logps(model, rollout, temperature)


@dataclass
class Policy:
    """What a GRPO step needs besides the model: prompts, the reward, and the reference."""

    rows: list[PromptRow]
    prompt_ids: list[list[int]]
    score: Any            # (prompts, completions, references) -> list[float]
    reward: Reward
    tokenizer: Any
    cfg: Any
    stops: list[int]
    frozen: Any = None    # full fine-tuning: a frozen copy of the starting model, for the KL

    def loss_sum(self, model, batch: RolloutBatch) -> tuple[torch.Tensor, dict]:
        rc = self.cfg.rlhf
        picked = [int(i) for i in batch.prompts.tolist()]
        rollout = sample_completions(model, [self.prompt_ids[i] for i in picked], group_size=rc.group_size,
                                     max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
                                     pad_id=self.tokenizer.pad_token_id, stops=self.stops)
        texts = [self.tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip()
                 for row, m in zip(rollout.completion, rollout.completion_mask)]
        rows = [self.rows[i] for i in picked for _ in range(rc.group_size)]
        rewards = torch.tensor(self.score(reward_prompts(rows, self.reward), texts, [r.reference for r in rows]))
        advantages, group_std = group_advantages(rewards, rc.group_size)
        device = rollout.sequences.device
        logp = completion_logps(model, rollout, rc.temperature)
        ref = reference_logps(model, self.frozen, rollout, rc.temperature) if rc.kl_coef > 0 else None
        mask = rollout.completion_mask
        loss, kl = grpo_loss_sum(logp, ref, advantages.to(device), mask, rc.kl_coef)
        batch.real_tokens = int(rollout.attention_mask.sum())
        stats = {"reward": float(rewards.sum()), "reward_std": float(group_std.sum()) * rc.group_size,
                 "completion_length": float(mask.sum()),
                 "flat_groups": float((group_std == 0).sum()) * rc.group_size}
        if kl is not None:
            stats["kl"] = float(kl.sum())
        return loss, stats


# --- the method -------------------------------------------------------------------------------------


def build(cfg, data: MethodData, model, tokenizer, run_dir: Path, log) -> Task:
    from hone.data.template import ensure_chat_template
    from hone.eval.runners import stop_token_ids

    ensure_chat_template(tokenizer)
    reward = resolve_reward(cfg.rlhf.reward)
    # label_match reads answers against the labels of text+label rows, else against every distinct reference.
    score = load_scorer(reward, data.labels or sorted({r.reference for r in data.train if r.reference}))
    room = cfg.data.max_seq_len - cfg.rlhf.max_new_tokens
    prompt_ids, truncated = tokenize_prompts(tokenizer, data.train, room)
    policy = Policy(data.train, prompt_ids, score, reward, tokenizer, cfg, stop_token_ids(model, tokenizer))
    if data.problems:
        from hone.data.validate import write_rejects

        write_rejects(run_dir / "rejects.jsonl", data.problems)
    group = cfg.rlhf.group_size

    def epoch_plan(epoch: int) -> list:
        order = list(range(len(data.train)))
        random.Random(f"{cfg.train.seed}:{epoch}").shuffle(order)
        return chunks(order, cfg.rlhf.prompts_per_batch)

    def collate(spec: list[int]) -> RolloutBatch:
        return RolloutBatch(torch.tensor(spec), float(len(spec) * group),
                            sum(len(prompt_ids[i]) for i in spec) * group)

    def before_training(trained) -> None:
        # Full fine-tuning has no adapter to switch off: keep a frozen copy of the starting weights (on
        # resume this still runs before the checkpoint is loaded, so the copy is of the start, not step k).
        if cfg.rlhf.kl_coef > 0 and not hasattr(trained, "disable_adapter"):
            policy.frozen = copy.deepcopy(trained).eval().requires_grad_(False)

    prompt_tokens = sum(map(len, prompt_ids))
    stats = {"train_examples": len(data.train), "validation_examples": len(data.held_out),
             "validation_source": data.held_out_source, "train_tokens": prompt_tokens, "truncated": truncated,
             "skipped": 0, "rejected": len(data.problems), "shapes": data.shapes, "labels": data.labels,
             "reward": reward.spec}
    return Task(epoch_plan=epoch_plan, collate=collate, loss_sum=policy.loss_sum, held_out=[],
                # An epoch's tokens: every prompt group_size times, each with at most max_new_tokens more.
                tokens_per_epoch=group * (prompt_tokens + len(prompt_ids) * cfg.rlhf.max_new_tokens),
                evaluate=reward_evaluator(cfg, tokenizer, data.held_out, score, reward, data.labels),
                stats=stats, labels=data.labels, before_training=before_training, token_loss=False,
                plot_stats=["reward", "kl", "completion_length", "flat_groups"])


def tokenize_prompts(tokenizer, rows: list[PromptRow], room: int) -> tuple[list[list[int]], int]:
    """Chat-template token ids of each prompt through the generation prompt, keeping the last `room` tokens
    (the turns nearest the answer); returns (ids, how many were cut)."""
    from hone.data.template import render_prompt

    ids = [render_prompt(tokenizer, list(r.messages)) for r in rows]
    return [x[-room:] for x in ids], sum(len(x) > room for x in ids)


def reward_evaluator(cfg, tokenizer, rows: list[PromptRow], score, reward: Reward, labels: list[str]):
    """Greedy answers to the held-out prompts, scored by the reward (and label accuracy for label rows)."""
    from hone.eval.metrics import match_label
    from hone.eval.runners import generate
    from hone.train.device import pick_device, use_bf16

    def evaluate(model) -> dict:
        start = time.perf_counter()
        outputs = generate(model, tokenizer, [list(r.messages) for r in rows], max_new_tokens=cfg.rlhf.max_new_tokens,
                           batch_size=cfg.eval.batch_size, bf16=use_bf16(pick_device(), cfg.train.precision))
        rewards = score(reward_prompts(rows, reward), outputs, [r.reference for r in rows])
        metrics = {reward.metric: sum(rewards) / max(1, len(rewards))}
        if labels and all(r.label is not None for r in rows) and reward.spec != "label_match":
            metrics["accuracy"] = sum(match_label(o, labels) == r.label for o, r in zip(outputs, rows)) / len(rows)
        seconds = time.perf_counter() - start
        metrics.update(seconds=seconds, seconds_per_example=seconds / max(1, len(rows)))
        # The report marks each answer by the reward, the run's own judge (exact match against the
        # reference would disagree with it, e.g. a label reward accepting a paraphrase).
        examples = [{"prompt": r.messages[-1].content, "reference": r.reference or "", "output": o, "reward": w,
                     "judged": {"ok": w > 0, "mark": f"{'✓' if w > 0 else '✗'} reward {w:.2f}"}}
                    for r, o, w in zip(rows, outputs, rewards)]
        return {"task": "rlhf", "n": len(rows), "metrics": metrics, "primary": reward.metric,
                "reward": reward.spec, "examples": examples}

    return evaluate
