"""hone's decoding loop for the inference engine: text out of tokens one at a time (multi-byte characters and
stop strings held back until they are whole), the next token per row (greedy, temperature, top-p with the
row's own generator), and a batch of rows decoded together over one KV cache, rows leaving as they finish and
new ones joining between steps. Pure over tensors and row objects; the engine (engine.py) owns threads,
models and requests.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:
    from hone.serve.engine import _Row

# --- text out of tokens, one token at a time ---------------------------------------------------------------


class IncrementalText:
    """Token ids in, text deltas out. The concatenated deltas are exactly the final text.

    Each step decodes all ids so far (byte-level BPE decodes a prefix to a prefix), and holds back what may
    still change: a trailing incomplete UTF-8 character (decoded as U+FFFD until its last byte arrives) and
    a tail that could be the start of a stop string (so a stop string never leaks out in pieces).
    """

    def __init__(self, tokenizer, stop: list[str] | tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""

    def add(self, token_id: int) -> tuple[str, bool]:
        """(delta to emit, whether a stop string was hit; then the delta is the final one)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=None)
        if cut is not None:
            return self.flush(text[:max(cut, len(self.sent))]), True
        if not text.startswith(self.sent):
            return "", False  # an earlier character is still being revised; wait for it to settle
        safe = len(text.rstrip("\ufffd"))
        safe = min(safe, len(text) - held_stop_prefix(text, self.stop))
        delta = text[len(self.sent):safe] if safe > len(self.sent) else ""
        self.sent += delta
        return delta, False

    def flush(self, text: str | None = None) -> str:
        """The rest of the text (everything decoded, or `text`), at the end of generation."""
        final = self.tokenizer.decode(self.ids, skip_special_tokens=True) if text is None else text
        delta = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent += delta
        return delta


def held_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


# --- choosing the next token --------------------------------------------------------------------------------


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of one probability vector: keep the most likely tokens whose cumulative probability
    before them is under top_p (the most likely token always stays); the rest get 0. Not renormalised
    (torch.multinomial does not need it)."""
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    keep = (sorted_p.cumsum(0) - sorted_p) < top_p
    keep[0] = True
    return torch.zeros_like(probs).scatter(0, order, sorted_p * keep)


def next_tokens(logits: torch.Tensor, rows: list["_Row"]) -> list[int]:
    """One token per row: argmax for greedy rows; for sampling rows, temperature and top_p then a draw from
    the row's own generator (on the CPU, so a seed gives the same draw on any device)."""
    greedy = logits.argmax(-1).tolist()
    out = []
    for j, row in enumerate(rows):
        if row.temperature <= 0:
            out.append(greedy[j])
            continue
        probs = torch.softmax(logits[j].float().cpu() / row.temperature, dim=-1)
        probs = top_p_filter(probs, row.top_p)
        out.append(int(torch.multinomial(probs, 1, generator=row.generator)))
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[r, width - len(p):] = 1
    return ids, mask


def prefill(model, rows: list[_Row], *, pad_id: int, device: torch.device, use_names: bool):
    """Run the rows' prompts (left-padded) through the model: (cache, mask, last positions, last logits).
    Positions count real tokens only (as generate() does), so a padded row sees what it would alone."""
    ids, mask = left_pad([r.prompt_ids for r in rows], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"adapter_names": [r.name for r in rows]} if use_names else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **extra)
    return out.past_key_values, mask, positions[:, -1], out.logits[:, -1, :]


def can_merge(cache) -> bool:
    """Rows can join a running batch when every cache layer is a plain growing one (no sliding window)."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer and layer.is_initialized for layer in getattr(cache, "layers", [None]))


def merge_caches(cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` (in place); the shorter side is left-padded with masked zeros.
    Returns the merged attention mask."""
    width = max(mask.shape[1], other_mask.shape[1])

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if not missing:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    for layer, new in zip(cache.layers, other.layers):
        layer.keys = torch.cat([pad(layer.keys, -2), pad(new.keys, -2)], dim=0)
        layer.values = torch.cat([pad(layer.values, -2), pad(new.values, -2)], dim=0)
    return torch.cat([pad(mask, 1), pad(other_mask, 1)], dim=0)


def decode_batch(model, rows: list[_Row], *, pad_id: int, device: torch.device, use_names: bool = False,
                 admit: Callable[[list[_Row]], list[_Row]] | None = None) -> int:
    """Prefill the rows, then one token per live row per step until every row is done. Returns how many
    rows joined on the way.

    Finished rows leave the batch (their cache and mask rows are dropped). Between steps `admit(live rows)`
    may hand over new rows (continuous batching): they are prefilled on their own, take their first token,
    and join the running cache, left-padded to a common length, so a request that arrives while a batch runs
    does not wait for the whole batch to finish. use_names: pass each row's adapter name (peft mixed batch).
    """
    live = list(rows)
    cache, mask, last, logits = prefill(model, live, pad_id=pad_id, device=device, use_names=use_names)
    tokens, joined = next_tokens(logits, live), 0
    while True:
        keep = [j for j, (row, t) in enumerate(zip(live, tokens)) if row.push(t)]
        if not keep:
            return joined
        if len(keep) < len(live):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, last = mask[index], last[index]
            live, tokens = [live[j] for j in keep], [tokens[j] for j in keep]
        new = admit(live) if admit is not None and can_merge(cache) else []
        if new:
            new_cache, new_mask, new_last, new_logits = prefill(model, new, pad_id=pad_id, device=device,
                                                                use_names=use_names)
            new_tokens = next_tokens(new_logits, new)
            stay = [j for j, (row, t) in enumerate(zip(new, new_tokens)) if row.push(t)]
            if stay:
                index = torch.tensor(stay, device=device)
                new_cache.batch_select_indices(index)
                mask = merge_caches(cache, mask, new_cache, new_mask[index])
                last = torch.cat([last, new_last[index]])
                live, tokens = live + [new[j] for j in stay], tokens + [new_tokens[j] for j in stay]
            joined += len(new)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        last = last + 1
        extra = {"adapter_names": [r.name for r in live]} if use_names else {}
        out = model(input_ids=torch.tensor([[t] for t in tokens], device=device), attention_mask=mask,
                    position_ids=last[:, None], past_key_values=cache, use_cache=True, **extra)
        tokens = next_tokens(out.logits[:, -1, :], live)
