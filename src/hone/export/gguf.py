"""Write a Llama-architecture model as one GGUF file with the gguf package, the way llama.cpp's
convert_hf_to_gguf.py does for Llama: its tensor names, its Q/K row permutation, its metadata keys.

    path = write_gguf(model, tokenizer, stops, out_dir / "model-q8_0.gguf", "q8_0", name="my-run")

The file carries the byte-level BPE tokenizer (tokens, types, merges, bos/eos/unk/pad ids), the chat
template and the stop token (tokenizer.ggml.eos_token_id = the template's end-of-turn token, which is what
transformers' GGUF loader and llama.cpp stop on). Types: f32, f16, bf16, q8_0 and the legacy 4/5-bit block
types the gguf package can quantise itself (q5_1, q5_0, q4_1, q4_0); k-quants need llama.cpp's quantiser.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from hone.export.chat import ExportError, end_of_turn_token

# hone name -> (ggml tensor type for 2-D weights, llama.cpp file type).
QUANTS = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
          "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1"), "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
          "q4_1": ("Q4_1", "MOSTLY_Q4_1"), "q4_0": ("Q4_0", "MOSTLY_Q4_0")}
# Below 8 bits the token embedding (also the output head when tied) stays at q8_0, as llama.cpp's
# quantiser keeps it in a higher type: it is the most sensitive tensor.
LOW_BIT = ("q5_1", "q5_0", "q4_1", "q4_0")
SUPPORTED_ARCH = ("llama",)
# A plain GPT-2 style byte-level pre-tokenizer, and SmolLM's (digits split one by one first): llama.cpp's
# names for them (transformers' GGUF loader rebuilds the GPT-2 split for either).
PRE_TOKENIZERS = {"ByteLevel": "gpt-2", "Digits+ByteLevel": "smollm"}


def check_exportable(config) -> None:
    """Refuse models this writer would get wrong, before anything is written."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_ARCH:
        raise ExportError(f"GGUF export supports Llama-architecture models ({', '.join(SUPPORTED_ARCH)}); this "
                          f"model is '{kind}'. Export it with --format hf and convert it with llama.cpp's "
                          "convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export does not write rope scaling ({rope.get('rope_type')}) yet; export with "
                          "--format hf and convert with llama.cpp")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("GGUF export: this Llama variant has attention/MLP biases, which hone does not write")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        raise ExportError("GGUF export: head_dim x heads != hidden size, which hone does not write")


def write_gguf(model, tokenizer, stops: list[int], path: Path, quant: str, *, name: str,
               description: str = "") -> Path:
    import gguf

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant}: GGUF types hone writes are {', '.join(QUANTS)}")
    config = model.config
    check_exportable(config)
    writer = gguf.GGUFWriter(str(path), "llama")
    _write_model_metadata(writer, config, quant, name, description)
    _write_tokenizer(writer, tokenizer, stops, config.vocab_size)
    for gguf_name, array, qtype in _tensors(model, quant):
        writer.add_tensor(gguf_name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_model_metadata(writer, config, quant: str, name: str, description: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(name)
    if description:
        writer.add_description(description)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, QUANTS[quant][1]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def pre_tokenizer_name(tokenizer) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE; refuse one it would not reproduce."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = "+".join(p.get("type", "?") for p in parts)
    if key not in PRE_TOKENIZERS or (parts[-1].get("use_regex") is False):
        raise ExportError(f"GGUF export: the tokenizer splits text with '{key}', which hone cannot name for "
                          "llama.cpp; export with --format hf and convert with llama.cpp")
    return PRE_TOKENIZERS[key]


def _write_tokenizer(writer, tokenizer, stops: list[int], vocab_size: int) -> None:
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if spec["model"].get("type") != "BPE" or not any(
            p.get("type") == "ByteLevel" for p in [spec.get("decoder") or {}]):
        raise ExportError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2 and Llama 3 "
                          "use); export with --format hf and convert with llama.cpp")
    vocab = tokenizer.get_vocab()
    by_id = {i: t for t, i in vocab.items()}
    added = {t: a for t, a in ((a.content, a) for a in tokenizer.added_tokens_decoder.values())}
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):
        token = by_id.get(i)
        if token is None:  # the model's embedding is wider than the vocabulary: llama.cpp's filler
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL if added[token].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _write_special_ids(writer, tokenizer, stops)


def _write_special_ids(writer, tokenizer, stops: list[int]) -> None:
    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
    # One EOS field is all transformers' GGUF loader reads, so it names the token answers end with.
    writer.add_eos_token_id(stops[0])
    if eot_id is not None:
        writer.add_eot_token_id(eot_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    adds_bos = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id] and tokenizer.bos_token_id is not None
    writer.add_add_bos_token(adds_bos)
    writer.add_add_eos_token(False)
    writer.add_chat_template(tokenizer.chat_template)


def _tensors(model, quant: str):
    """(gguf name, array, ggml type) for every weight, in llama.cpp's layout."""
    import gguf
    from gguf.quants import quantize

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    wanted = getattr(gguf.GGMLQuantizationType, QUANTS[quant][0])
    tied = getattr(config, "tie_word_embeddings", False)
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd; a file without `output` loads as tied
        base, suffix = hf_name.rsplit(".", 1)
        gguf_name = names.get_name(base)
        if gguf_name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for weight '{hf_name}'")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if gguf_name.endswith("attn_q"):
            data = _permute(data, config.num_attention_heads, config.num_attention_heads)
        elif gguf_name.endswith("attn_k"):
            data = _permute(data, config.num_attention_heads, config.num_key_value_heads)
        qtype = _tensor_type(gguf_name, data, wanted, quant)
        yield f"{gguf_name}.{suffix}", quantize(data, qtype), qtype


def _tensor_type(gguf_name: str, data: np.ndarray, wanted, quant: str):
    """Norms (1-D) stay F32 as llama.cpp keeps them; rows that do not fill whole quant blocks fall back to F16."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if data.ndim < 2:
        return Q.F32
    if quant in LOW_BIT and gguf_name in ("token_embd", "output"):
        wanted = Q.Q8_0
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if data.shape[-1] % block:
        return Q.F16
    return wanted


def _permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's rotary layout for Q and K rows (convert_hf_to_gguf.py LlamaModel.permute); transformers'
    GGUF loader undoes exactly this."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def load_gguf_export(path: Path):
    """The file as transformers' GGUF reader loads it: tokenizer and model rebuilt from the file alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone.export.hf import eos_list
    from hone.export.parity import Side

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    gen = model.generation_config
    return Side(model, tokenizer, eos_list(gen.eos_token_id), gen.pad_token_id)


def gguf_quant(path: Path) -> str | None:
    """hone's name for a GGUF file's type (general.file_type), or None for a type hone does not write."""
    import gguf

    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    if field is None:
        return None
    file_type = gguf.LlamaFileType(int(field.contents()))
    return next((q for q, (_, ft) in QUANTS.items() if ft == file_type.name), None)
