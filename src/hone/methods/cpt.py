"""Continued pretraining (`method: cpt`): the next-token loss on every token of raw domain documents.

Data is one document per row (`text`, or `content` / `document`); no chat template. Each document is
tokenised, followed by a separator (the tokenizer's EOS unless cpt.separator says otherwise), and the
documents are concatenated into one stream that is cut into blocks of data.max_seq_len tokens: a long
document spans several blocks, short ones share a block, and only the last block is short (its row is
padded). Consecutive blocks share one token, the last of one being the first of the next, so every token of
the stream after the very first is predicted exactly once; the usual cut into disjoint blocks never
predicts each block's first token. Every target has weight 1, the separator and the first token of the next
document included (the model learns where documents end and how they begin), and attention runs across
document boundaries inside a block, as in GPT-style pretraining.

The held-out split is made over documents, before packing, so no document has blocks on both sides.
The report shows perplexity on that held-out domain text (the primary metric) and on a general-English
sample (cpt.general_text, else the one shipped in hone/demo_data), before and after, so forgetting shows.

Embeddings: train.loop.build_optimizer gives parameters named *embed* / *lm_head* the learning rate
train.learning_rate x cpt.embedding_lr_ratio when they are trainable: always with adapter: full, and with
an adapter when cpt.train_embeddings is set (they are unfrozen after the adapter is applied and saved
beside it in final/, where peft's loader puts them back into the base).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hone.data.pack import MicroBatch
from hone.data.template import Tokenized
from hone.methods import (
    MethodData,
    RowError,
    Task,
    batch_to,
    read_method_rows,
    text_field,
    validate_method_data,
)
from hone.methods.sft import packed_batches, packed_task, sft_loss_sum

TEXT_KEYS = ("text", "content", "document")
NEEDS = "raw text in 'text' (or 'content' / 'document'), one document per line"
# Keys of other methods' rows, to say what a mistaken file looks like rather than just "missing 'text'".
OTHER_SHAPES = {"messages": "a chat", "conversations": "a chat", "conversation": "a chat",
                "chosen": "a preference pair", "prompt": "a prompt/answer pair", "instruction": "an instruction",
                "query": "a query/passage pair"}
GENERAL_TEXT = Path(__file__).resolve().parent.parent / "demo_data" / "general_text.jsonl"


# --- data: rows -> documents ----------------------------------------------------------------------------


def parse_document(row: dict) -> str:
    """A row's document text; a chat / pair row gets an error saying cpt wants raw text."""
    if all(row.get(k) is None for k in TEXT_KEYS):
        shape = next((k for k in OTHER_SHAPES if k in row), None)
        if shape:
            raise RowError("not_raw_text", (
                f"this line is {OTHER_SHAPES[shape]} ('{shape}'), but cpt trains on raw documents: it needs "
                f"{NEEDS}. Use method: sft (or dpo) for this data, or convert it to {{\"text\": ...}} rows"))
    return text_field(row, *TEXT_KEYS)


def general_text_path(cfg) -> Path:
    return Path(cfg.cpt.general_text) if cfg.cpt.general_text else GENERAL_TEXT


def read_general_text(cfg) -> list[str]:
    """The general-English documents; any bad line stops the run (it is a measuring stick, not data)."""
    from hone.train.prepare import DataProblems

    path = general_text_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"cpt.general_text: {path} does not exist (a .jsonl/.csv/.parquet file of "
                                "{text} rows; leave it unset for the general-English sample shipped with hone)")
    rows, problems = read_method_rows(path, parse_document, NEEDS)
    if problems or not rows:
        raise DataProblems(problems, f"cpt.general_text: {path} must hold {NEEDS}.")
    return [text for _, text in rows]


def validate(cfg) -> MethodData:
    """Read and split the documents (the split is over whole documents), and check the general text,
    before any model loads."""
    data = validate_method_data(cfg, parse_document, NEEDS, key=lambda doc: doc)
    read_general_text(cfg)
    return data


def drop_duplicates(train: list[str], held_out: list[str], within: bool = True) -> tuple[list[str], int]:
    """Train documents without copies of held-out documents (which would leak into the domain perplexity)
    and, when `within`, without exact repeats. Returns (kept, how many were dropped)."""
    held, seen = set(held_out), set()
    kept = []
    for doc in train:
        if doc not in held and not (within and doc in seen):
            seen.add(doc)
            kept.append(doc)
    return kept, len(train) - len(kept)


# --- packing: documents -> one token stream -> blocks ---------------------------------------------------


def separator_id(tokenizer, separator: str | None) -> int:
    if separator is None:
        if tokenizer.eos_token_id is None:
            raise ValueError("cpt: the tokenizer has no EOS token to put between documents; set cpt.separator")
        return tokenizer.eos_token_id
    ids = tokenizer(separator, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"cpt.separator {separator!r} is {len(ids)} tokens for this tokenizer; give a single "
                         "token, e.g. its EOS or '<|endoftext|>'")
    return ids[0]


def token_stream(tokenizer, documents: list[str], sep_id: int, max_tokens: int | None = None) -> list[int]:
    """Every document's tokens (no special tokens, no chat template) followed by the separator, end to end."""
    stream: list[int] = []
    if not documents:
        return stream
    for ids in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]:
        stream += ids + [sep_id]
        if max_tokens is not None and len(stream) >= max_tokens:
            return stream[:max_tokens]
    return stream


def cut_blocks(stream: list[int], block_len: int) -> list[Tokenized]:
    """Blocks of block_len tokens (the last may be shorter) that overlap by one token, so each token after
    the first is a target exactly once. A block's first token is context only (weight 0)."""
    step = block_len - 1
    return [Tokenized(stream[i:i + block_len], [0.0] + [1.0] * (len(stream[i:i + block_len]) - 1))
            for i in range(0, len(stream) - 1, step)]


def pack_documents(tokenizer, documents: list[str], block_len: int, sep_id: int,
                   max_tokens: int | None = None) -> tuple[list[Tokenized], int]:
    """(blocks, tokens in the stream)."""
    stream = token_stream(tokenizer, documents, sep_id, max_tokens)
    return cut_blocks(stream, block_len), len(stream)


# --- the task ---------------------------------------------------------------------------------------------


def build(cfg, data: MethodData, model, tokenizer, run_dir: Path, log) -> Task:
    from hone.data.validate import write_rejects

    if data.problems:
        write_rejects(run_dir / "rejects.jsonl", data.problems)
    train_docs, dropped = drop_duplicates(data.train, data.held_out, within=cfg.data.dedupe)
    if not train_docs:
        raise ValueError(f"{cfg.data.train}: every training document also appears in the held-out text")
    if dropped:
        log.event("warn", f"cpt: dropped {dropped} training document(s) that repeat another or a held-out one")
    sep = separator_id(tokenizer, cfg.cpt.separator)
    block = cfg.data.max_seq_len
    train, train_tokens = pack_documents(tokenizer, train_docs, block, sep)
    held_out, held_tokens = pack_documents(tokenizer, data.held_out, block, sep)
    general_docs = read_general_text(cfg)
    general, general_tokens = pack_documents(tokenizer, general_docs, block, sep, cfg.cpt.general_max_tokens)
    if not train:
        raise ValueError(f"{cfg.data.train}: the documents hold fewer than 2 tokens; nothing to learn")
    rows_per_batch = max(1, cfg.train.batch_tokens // block)
    if cfg.cpt.embedding_lr_ratio != 1.0 and cfg.weights != "full" and not cfg.cpt.train_embeddings:
        log.event("warn", f"cpt.embedding_lr_ratio={cfg.cpt.embedding_lr_ratio} has no effect: with adapter "
                          f"{cfg.weights} the embeddings are frozen (set cpt.train_embeddings: true to train them)")
    evaluate = perplexity_evaluator(cfg, packed_batches(held_out, block, rows_per_batch, tokenizer.pad_token_id),
                                    packed_batches(general, block, rows_per_batch, tokenizer.pad_token_id),
                                    len(data.held_out))
    stats = {"train_examples": len(train), "validation_examples": len(held_out),
             "validation_source": data.held_out_source, "train_tokens": train_tokens,
             "target_tokens": sum(t.n_targets for t in train), "truncated": 0, "skipped": dropped,
             "rejected": len(data.problems),
             "shapes": {"train documents": len(train_docs), "held-out documents": len(data.held_out),
                        "general documents": len(general_docs)},
             "train_documents": len(train_docs), "validation_documents": len(data.held_out),
             "validation_tokens": held_tokens, "general_tokens": general_tokens, "duplicates_dropped": dropped,
             "block_len": block}
    return packed_task(train, held_out, cfg, tokenizer.pad_token_id, loss_sum=sft_loss_sum, evaluate=evaluate,
                       stats=stats, before_training=embedding_trainer(cfg, log))


def mean_token_loss(model, batches: list[MicroBatch], device, bf16: bool) -> float | None:
    """Cross-entropy per target token over fixed batches (the loop's validation loss, computed the same way)."""
    from hone.train.device import autocast

    total, targets = 0.0, 0.0
    with torch.no_grad():
        for batch in batches:
            batch = batch_to(batch, device)
            with autocast(device, bf16):
                total += float(sft_loss_sum(model, batch))
            targets += batch.target_weight
    return total / targets if targets else None


def perplexity_evaluator(cfg, domain: list[MicroBatch], general: list[MicroBatch], n_documents: int):
    """Held-out domain perplexity (primary, lower is better) and general-text perplexity (forgetting)."""
    from hone.train.device import pick_device, use_bf16
    from hone.train.loop import capped_perplexity

    def evaluate(model) -> dict:
        device = pick_device()
        bf16 = use_bf16(device, cfg.train.precision)
        was_training = model.training
        model.eval()
        metrics = {}
        for name, batches in (("domain", domain), ("general", general)):
            loss = mean_token_loss(model, batches, device, bf16)
            if loss is not None:
                metrics[f"{name}_perplexity"] = capped_perplexity(loss)
                metrics[f"{name}_loss"] = loss
        model.train(was_training)
        return {"task": "perplexity", "n": n_documents, "metrics": metrics, "primary": "domain_perplexity"}

    return evaluate


# --- embeddings under an adapter ------------------------------------------------------------------------


def embedding_modules(model) -> list:
    """Input embeddings and LM head (one module's weight when they are tied)."""
    modules = [model.get_input_embeddings(), model.get_output_embeddings()]
    return [m for m in modules if m is not None]


def embedding_trainer(cfg, log):
    """before_training: unfreeze the embeddings under an adapter when cpt.train_embeddings asks for it. The
    optimizer is built after this, so they get the embedding learning rate; checkpoints hold them (they are
    trainable) and resume restores them."""
    if not cfg.cpt.train_embeddings or cfg.weights == "full":
        return None

    def unfreeze(model) -> None:
        for module in embedding_modules(model):
            module.weight.requires_grad_(True)
        n = sum(p.numel() for p in {id(m.weight): m.weight for m in embedding_modules(model)}.values())
        log.event("info", f"cpt: training the embeddings too ({n:,} parameters, learning rate x "
                          f"{cfg.cpt.embedding_lr_ratio})")

    return unfreeze


def save(model, tokenizer, cfg, target: Path) -> None:
    """final/: as usual, except that an adapter run that trained the embeddings stores them in the adapter
    file (peft's save_embedding_layers); `PeftModel.from_pretrained` loads them back into the base."""
    from hone.models.adapters import save_weights

    if not cfg.cpt.train_embeddings or cfg.weights == "full":
        save_weights(model, tokenizer, cfg, target)
        return
    state = model.state_dict()
    head = model.get_output_embeddings()
    if head is not None and head.weight is model.get_input_embeddings().weight:
        # Tied: store the matrix once (under the input embeddings' name); loading it restores both.
        head_name = next(n for n, m in model.named_modules() if m is head)
        state = {k: v for k, v in state.items() if not k.startswith(f"{head_name}.")}
    model.save_pretrained(target, state_dict=state, save_embedding_layers=True)
    tokenizer.save_pretrained(target)
