"""Knowledge distillation: a (smaller) student learns to answer like a teacher.

The data is SFT data (any shape `hone train` accepts); `distill.teacher` names the teacher (any model.base
value, or a hone run directory, adapters included). The student is model.base, optionally shrunk to some of
its layers (`distill.student_layers`, see hone.models.shrink). Two modes:

- logits (teacher and student share a tokenizer): at every target token of the reference answer,
      loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(reference)
  summed over target tokens and divided by their number, as SFT is. The T^2 keeps the KL gradient's size
  independent of T (Hinton et al. 2015). The teacher runs under no_grad in eval mode inside the loss; it is
  frozen and outside the optimizer, so checkpoints (trainable parameters only) never hold it.
- sequence (tokenizers differ, so distributions cannot be lined up token by token): before training, the
  teacher writes greedy answers to the training prompts (cached in run_dir/teacher_outputs.jsonl, reused on
  resume and never regenerated) and the student does SFT on them (Kim & Rush 2016).

`auto` picks logits when the tokenizers match. The evaluation is the SFT task metric on held-out data plus
`teacher_agreement`: the share of held-out prompts where the student's answer equals the teacher's (teacher
answers computed once, cached in run_dir/teacher_heldout.jsonl). The "base" column of the report is the
(shrunk) student before training.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from hone.config import EMBEDDED_MODEL, ConfigError
from hone.methods import Task, chunks, sft
from hone.records import Message

TEACHER_OUTPUTS = "teacher_outputs.jsonl"
TEACHER_HELDOUT = "teacher_heldout.jsonl"
ANSWERS_PER_WRITE = 64  # teacher answers generated between appends to the cache (what a crash can lose)
MERGEABLE = ("full", "lora", "dora", "ia3")  # weights a shrunk student can be saved with as a plain model

# A conversation rendered by both tokenizers: identical ids mean the teacher reads the student's tokens.
PROBE = [Message("system", "Answer briefly."), Message("user", "Where is my package? Order #1234, café.")]


# --- the loss (pure tensor functions) ------------------------------------------------------------------


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p || q) per position, p = softmax(teacher / T), q = softmax(student / T) (forward KL: the student
    must cover every token the teacher gives mass to). Shapes (n, vocab) -> (n,), in float32."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distill_terms(student_logits, teacher_logits, labels, weights, *, alpha: float, temperature: float):
    """(loss sum, KL sum, CE sum) over target positions, each position weighted like SFT:
    loss = sum_i w_i * (alpha * T^2 * KL_i + (1 - alpha) * CE_i). Logit columns beyond the smaller of the two
    heads (padding rows some models add to their vocabulary) take no part in the KL."""
    v = min(student_logits.shape[-1], teacher_logits.shape[-1])
    kl = forward_kl(student_logits[:, :v], teacher_logits[:, :v], temperature)
    ce = F.cross_entropy(student_logits.float(), labels, reduction="none")
    loss = (weights * (alpha * temperature ** 2 * kl + (1 - alpha) * ce)).sum()
    return loss, (weights * kl).sum(), (weights * ce).sum()


def logit_distill_loss(teacher, *, alpha: float, temperature: float):
    """loss_sum(model, batch) for the loop: student and teacher heads applied at target positions only."""

    def loss_sum(model, batch):
        logits, labels, weights = sft.target_logits(model, sft.hidden_states(model, batch), batch)
        if labels.numel() == 0:
            zero = sft.zero_connected_to_graph(model)
            return zero, {"distill_kl": zero.detach(), "reference_ce": zero.detach()}
        with torch.no_grad():
            teacher_logits = sft.target_logits(teacher, sft.hidden_states(teacher, batch), batch)[0]
        loss, kl, ce = distill_terms(logits, teacher_logits, labels, weights, alpha=alpha, temperature=temperature)
        return loss, {"distill_kl": kl.detach(), "reference_ce": ce.detach()}

    return loss_sum


# --- config and data checks (no model loaded) ----------------------------------------------------------


def teacher_problem(teacher: str | None, allow_download: bool) -> str | None:
    """Why `teacher` cannot be a teacher, judged from the file system alone; None when it looks loadable."""
    if not teacher:
        return ("distill.teacher is not set: give the teacher model (a model.base value: "
                f"'{EMBEDDED_MODEL}', a model directory or a .gguf file) or a hone run directory")
    if teacher == EMBEDDED_MODEL:
        return None
    p = Path(teacher).expanduser()
    if p.is_dir():
        if (p / "config.yaml").is_file():
            return None if (p / "final").is_dir() else (
                f"distill.teacher: {p} is a hone run directory without final/ weights: the run has not "
                "finished (resume it with `hone train CONFIG --resume`) or failed")
        if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
            return None
        return (f"distill.teacher: {p} is neither a model directory (config.json + .safetensors) nor a hone run "
                "directory (config.yaml + final/)")
    if p.is_file():
        return None if p.suffix == ".gguf" else f"distill.teacher: {p} is a file but not a .gguf model"
    if allow_download and teacher.count("/") == 1 and not teacher.startswith((".", "/", "~")):
        return None  # a hub id, fetched because model.allow_download is on
    return (f"distill.teacher: '{teacher}' does not exist: expected '{EMBEDDED_MODEL}', a model directory, a "
            ".gguf file or a hone run directory (a hub id needs model.allow_download=true)")


def validate(cfg):
    from hone.models.shrink import LayerSpecError, check_layer_spec

    problem = teacher_problem(cfg.distill.teacher, cfg.model.allow_download)
    if problem:
        raise ConfigError(problem)
    if cfg.distill.student_layers is not None:
        try:
            check_layer_spec(cfg.distill.student_layers)
        except LayerSpecError as e:
            raise ConfigError(f"distill.student_layers: {e}") from None
        if cfg.weights not in MERGEABLE:
            raise ConfigError(
                f"distill.student_layers with adapter '{cfg.weights}': a shrunk student is saved as a plain "
                f"model, which needs weights that merge into it ({', '.join(MERGEABLE)}); full suits it best")
    return sft.validate(cfg)


# --- models --------------------------------------------------------------------------------------------


def load(cfg):
    """The student: model.base, shrunk to distill.student_layers when set."""
    from hone.models.load import Loaded, load_model
    from hone.models.shrink import LayerSpecError, decoder_layers, layer_indices, shrink_model

    loaded = load_model(cfg.model.base, allow_download=cfg.model.allow_download,
                        trust_remote_code=cfg.model.trust_remote_code)
    spec = cfg.distill.student_layers
    if spec is None:
        return loaded
    n = len(decoder_layers(loaded.model))
    try:
        keep = layer_indices(spec, n)
    except LayerSpecError as e:
        raise ConfigError(f"distill.student_layers: {e}") from None
    shrink_model(loaded.model, keep)
    return Loaded(loaded.model, loaded.tokenizer, f"{loaded.description} (layers {keep} of {n})")


def load_teacher(cfg):
    """The teacher, frozen and in eval mode; a LoRA/(IA)3 run's adapter is merged (one fewer matmul a layer)."""
    from hone.models.load import load_model

    loaded = load_model(cfg.distill.teacher, allow_download=cfg.model.allow_download,
                        trust_remote_code=cfg.model.trust_remote_code)
    model = loaded.model
    if not prompt_learning(model) and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.requires_grad_(False)
    model.eval()
    return dataclasses.replace(loaded, model=model)


def prompt_learning(model) -> bool:
    """A prefix/prompt-tuning peft model: its virtual tokens live outside the decoder, so only its own
    generate() sees them (logit distillation cannot read it at packed positions)."""
    config = getattr(model, "active_peft_config", None)
    return bool(config is not None and config.is_prompt_learning)


def tokenizer_mismatch(student_tok, teacher_tok) -> str | None:
    """None when the two tokenizers give the same ids to the same text, chat template and special tokens
    included (so logits line up token for token); else why they do not."""
    from hone.data.template import ensure_chat_template, render_prompt

    if student_tok.get_vocab() != teacher_tok.get_vocab():
        return f"their vocabularies differ ({len(student_tok)} vs {len(teacher_tok)} tokens)"
    for tok in (student_tok, teacher_tok):
        ensure_chat_template(tok)
    if render_prompt(student_tok, PROBE) != render_prompt(teacher_tok, PROBE):
        return "their chat templates render the same conversation to different tokens"
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        return "they end a turn with different tokens"
    return None


def pick_mode(cfg, student_tok, teacher) -> tuple[str, str]:
    """(mode, why) for distill.mode; raises ConfigError when logits were asked for and cannot work."""
    mismatch = tokenizer_mismatch(student_tok, teacher.tokenizer)
    if prompt_learning(teacher.model):
        mismatch = mismatch or "the teacher is a prefix/prompt-tuning run (its virtual tokens only work in generate)"
    if cfg.distill.mode == "logits" and mismatch:
        raise ConfigError(f"distill.mode=logits needs the teacher to share the student's tokenizer, but {mismatch}; "
                          "use distill.mode=sequence (or auto)")
    if cfg.distill.mode == "sequence":
        return "sequence", "distill.mode=sequence"
    if cfg.distill.mode == "logits":
        return "logits", "distill.mode=logits"
    return ("sequence", f"auto: {mismatch}") if mismatch else ("logits", "auto: the tokenizers match")


def save(model, tokenizer, cfg, target: Path) -> None:
    """A shrunk student is saved as a plain model (its adapter merged into a copy): a run's final/ adapter
    would otherwise be loaded over the unshrunk model.base."""
    from hone.models.adapters import is_adapter, save_weights
    from hone.models.load import save_hf_dir

    if cfg.distill.student_layers is None or not is_adapter(cfg):
        save_weights(model, tokenizer, cfg, target)
        return
    save_hf_dir(copy.deepcopy(model).merge_and_unload(), tokenizer, target)


# --- teacher answers, cached -----------------------------------------------------------------------------


def prompt_key(messages: list[Message]) -> str:
    return hashlib.sha256(json.dumps([[m.role, m.content] for m in messages]).encode()).hexdigest()[:32]


def read_answers(path: Path) -> dict[str, str]:
    """{prompt key: answer} from a cache file. A line cut short by a crash is dropped (and the file trimmed to
    its last complete line, so appending starts on a fresh line)."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]
    if len(complete) != len(raw):
        path.write_bytes(complete)
    answers = {}
    for line in complete.decode("utf-8").splitlines():
        row = json.loads(line)
        answers[row["key"]] = row["output"]
    return answers


def cached_answers(path: Path, prompts: list[list[Message]], answer) -> tuple[list[str], int]:
    """(answers to prompts, how many were generated now). Answers in `path` are reused; the missing ones come
    from answer(list of prompts) in groups, each group appended as it finishes, so an interrupted run keeps
    what the teacher already wrote."""
    done = read_answers(path)
    keys = [prompt_key(p) for p in prompts]
    by_key = dict(zip(keys, prompts))
    missing = [k for k in dict.fromkeys(keys) if k not in done]
    with path.open("a", encoding="utf-8") as f:
        for group in chunks(missing, ANSWERS_PER_WRITE):
            for k, out in zip(group, answer([by_key[k] for k in group])):
                done[k] = out
                f.write(json.dumps({"key": k, "output": out}, ensure_ascii=False) + "\n")
            f.flush()
    return [done[k] for k in keys], len(missing)


def teacher_answerer(cfg, teacher):
    from hone.eval.runners import generate
    from hone.train.device import pick_device, use_bf16

    bf16 = use_bf16(pick_device(), cfg.train.precision)

    def answer(prompts: list[list[Message]]) -> list[str]:
        return generate(teacher.model, teacher.tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                        batch_size=cfg.eval.batch_size, bf16=bf16)

    return answer


def with_answer(conv, answer: str):
    """The conversation with its last assistant message replaced by `answer` (the teacher's)."""
    i = conv.last_assistant_index()
    messages = list(conv.messages)
    messages[i] = dataclasses.replace(messages[i], content=answer)
    return dataclasses.replace(conv, messages=messages)


# --- the method ----------------------------------------------------------------------------------------


def build(cfg, data, model, tokenizer, run_dir: Path, log) -> Task:
    from hone.train.prepare import tokenize_data

    teacher = load_teacher(cfg)
    teacher.model.to(next(model.parameters()).device)
    mode, why = pick_mode(cfg, tokenizer, teacher)
    answer = teacher_answerer(cfg, teacher)
    info = {"mode": mode, "teacher": teacher.description, "teacher_params": n_params(teacher.model),
            "student_params": n_params(model)}
    log.event("info", f"distill: {mode} mode ({why}); teacher {teacher.description} "
                      f"({info['teacher_params']:,} params), student {info['student_params']:,} params")
    if mode == "sequence":
        outputs, fresh = cached_answers(run_dir / TEACHER_OUTPUTS, [c.prompt_messages() for c in data.train], answer)
        log.event("info", f"distill: teacher answers for {len(outputs)} training prompts "
                          f"({fresh} generated, {len(outputs) - fresh} from {TEACHER_OUTPUTS})")
        data = dataclasses.replace(data, train=[with_answer(c, a) for c, a in zip(data.train, outputs)])
        info["empty_teacher_answers"] = sum(not a.strip() for a in outputs)
    prepared = tokenize_data(data, tokenizer, cfg.data, run_dir / "rejects.jsonl")
    held = prepared.held_out_conversations
    teacher_held, _ = cached_answers(run_dir / TEACHER_HELDOUT, [c.prompt_messages() for c in held], answer)
    teacher_scores = score_outputs(teacher_held, held, prepared.labels)
    log.event("info", "distill: teacher on held-out: " + ", ".join(f"{k} {v:.3f}" for k, v in teacher_scores.items()))
    if mode == "logits":
        loss = logit_distill_loss(teacher.model, alpha=cfg.distill.alpha, temperature=cfg.distill.temperature)
    else:
        loss = sft.sft_loss_sum
        del teacher, answer  # sequence mode is done with the teacher: give its memory back before training
        gc.collect()
    evaluate = agreement_evaluator(sft.generation_evaluator(cfg, tokenizer, held, prepared.labels),
                                   teacher_held, teacher_scores)
    return sft.packed_task(prepared.train, prepared.held_out, cfg, tokenizer.pad_token_id, loss_sum=loss,
                           evaluate=evaluate, stats={**prepared.stats, "method_facts": method_facts(info)}, labels=prepared.labels)


def method_facts(info: dict) -> dict:
    """What the report's data table says about this distillation (readable names, counts as numbers)."""
    facts = {"distillation mode": info["mode"], "teacher": info["teacher"],
             "teacher parameters": info["teacher_params"], "student parameters": info["student_params"]}
    if "empty_teacher_answers" in info:
        facts["empty teacher answers"] = info["empty_teacher_answers"]
    return facts


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def score_outputs(outputs: list[str], conversations: list, labels: list[str]) -> dict[str, float]:
    """The teacher's task metric on the held-out answers it wrote (the student's target to reach)."""
    from hone.eval.metrics import classification_metrics, generation_metrics, match_label

    if not conversations:
        return {}
    if labels and all(c.label is not None for c in conversations):
        cls = classification_metrics([match_label(o, labels) for o in outputs], [c.label for c in conversations],
                                     labels)
        return {"teacher_accuracy": cls["accuracy"]}
    return {"teacher_token_f1": generation_metrics(outputs, [c.reference() for c in conversations])["token_f1"]}


def agreement(outputs: list[str], teacher_outputs: list[str]) -> float:
    """Share of prompts where the two answers are equal after SQuAD normalisation (case, punctuation, articles)."""
    from hone.eval.metrics import normalize_answer

    if not outputs:
        return 0.0
    return sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(outputs, teacher_outputs)) / len(outputs)


def agreement_evaluator(task_evaluate, teacher_outputs: list[str], teacher_scores: dict):
    """The SFT evaluation plus teacher_agreement (and the teacher's own score beside it, for reference)."""

    def evaluate(model) -> dict:
        result = task_evaluate(model)
        result["metrics"] = {**result["metrics"], "teacher_agreement": agreement(result["outputs"], teacher_outputs),
                             **teacher_scores}
        result["primary"] = "accuracy" if result["task"] == "label" else "token_f1"
        for example, teacher_output in zip(result.get("examples") or [], teacher_outputs):
            example["teacher"] = teacher_output
        return result

    return evaluate
