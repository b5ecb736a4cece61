"""Which weights a run trains: a peft adapter over a frozen base, or every weight (`full`).

    check_supported(cfg)                            # before any model loads: can this adapter run here?
    loaded = load_quantized(cfg)                    # qlora only: the base with 4-bit NF4 linear layers
    model = apply_weights(model, cfg)               # after the base model was evaluated
    save_weights(model, tokenizer, cfg, final_dir)  # an adapter directory, or a full HF directory

Adapters: lora, dora, ia3 and qlora (LoRA over a 4-bit NF4 base, via bitsandbytes) change the base's layers
in place, so hone's fast SFT path (decoder, then the LM head at target positions only) sees them. prefix and
prompt tuning are prompt-learning adapters: peft adds their virtual tokens in its own forward (prompt: learnt
input embeddings before the text; prefix: learnt keys and values in every layer), which a direct decoder
call would skip. `virtual_token_hidden_states` runs that forward for packed rows (see its docstring).

The peft task type comes from the method (a reward model is SEQ_CLS, an embedding model FEATURE_EXTRACTION).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from hone.models.load import ModelError

ADAPTERS = ("lora", "dora", "ia3", "qlora", "prefix", "prompt")
PROMPT_LEARNING = ("prefix", "prompt")
# Objectives whose loss runs through peft's forward or `virtual_token_hidden_states` (via sft.hidden_states),
# so virtual tokens take part. The others call the decoder directly and would train nothing.
PROMPT_LEARNING_OBJECTIVES = ("sft", "cpt", "distill", "rlhf")
MIN_BITSANDBYTES = (0, 45)
QLORA_HINT = ("Install it with `pip install 'hone[qlora]'` (bitsandbytes>=0.45 runs on CUDA GPUs; recent "
              "releases on CPUs too), or train plain `lora` (the same adapter over the unquantised base; it "
              "needs more memory for the base weights).")


class AdapterError(ModelError):
    """An adapter that cannot run with this config or on this machine, phrased for the user."""


# --- what can run here (called before any model loads) --------------------------------------------------


def check_supported(cfg) -> None:
    """Raise AdapterError if the chosen weights cannot be trained with this config on this machine."""
    if cfg.weights in PROMPT_LEARNING and cfg.objective not in PROMPT_LEARNING_OBJECTIVES:
        raise AdapterError(
            f"adapter '{cfg.weights}' does not work with method '{cfg.method}' yet: its loss reads the network "
            "directly, so the virtual tokens would take no part and nothing would train. Use it with "
            f"{', '.join(PROMPT_LEARNING_OBJECTIVES)}, or pick lora, dora, ia3 or qlora.")
    if cfg.weights != "qlora":
        return
    from hone.train.device import pick_device

    device = pick_device()
    problem = bitsandbytes_problem(device)
    if problem:
        raise AdapterError(f"qlora needs bitsandbytes 4-bit layers, which cannot run here: {problem}. "
                           f"{QLORA_HINT}")
    base = Path(cfg.model.base).expanduser()
    if (base / "final" / "adapter_config.json").is_file():
        raise AdapterError(f"qlora over {base}: that run's final/ is an adapter, not a model. Merge it into "
                           "full weights first (`hone export`), or train it with lora.")


def bitsandbytes_problem(device: torch.device) -> str | None:
    """Why 4-bit NF4 training cannot run on `device`, or None when it can.

    A 4-bit layer's forward and backward are tried on the device: bitsandbytes' device support changes from
    release to release (CPUs came late), so trying is the only honest check. It takes milliseconds.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        return f"bitsandbytes is not installed ({e})"
    except Exception as e:  # a broken native library raises all sorts of errors at import
        return f"bitsandbytes failed to import ({type(e).__name__}: {e})"
    version = tuple(int(p) for p in bnb.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_BITSANDBYTES:
        return f"bitsandbytes {bnb.__version__} is older than 0.45"
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to(device)
        x = torch.randn(2, 64, device=device, requires_grad=True)
        layer(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return f"bitsandbytes {bnb.__version__} gave no usable gradient through a 4-bit layer on {device}"
    except Exception as e:
        return f"bitsandbytes {bnb.__version__} cannot run a 4-bit layer on {device} ({type(e).__name__}: {e})"
    return None


# --- qlora: the base with 4-bit NF4 linear layers --------------------------------------------------------


def compute_dtype(cfg) -> torch.dtype:
    """The 4-bit layers' matmul dtype: bf16 where the device runs it fast ('auto'), else fp32."""
    from hone.train.device import pick_device, use_bf16

    choice = cfg.quant.compute_dtype
    if choice == "auto":
        choice = "bf16" if use_bf16(pick_device(), "auto") else "fp32"
    return torch.bfloat16 if choice == "bf16" else torch.float32


def quantization_config(cfg):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=cfg.quant.double_quant,
                              bnb_4bit_compute_dtype=compute_dtype(cfg))


def load_quantized(cfg):
    """The base model for qlora, its linear layers quantised to 4-bit NF4 as they load.

    An HF directory (the embedded model's cached one included) or a hub id loads through transformers'
    BitsAndBytesConfig, so the full-precision weights never sit in memory all at once. A .gguf file or a run
    directory with full weights loads as usual and is quantised in place (the same NF4 weights).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hone.config import EMBEDDED_MODEL
    from hone.models.load import Loaded, _finish, embedded_model_dir, load_model
    from hone.train.device import pick_device

    mc = cfg.model
    path = Path(mc.base).expanduser()
    if mc.base == EMBEDDED_MODEL:
        path = embedded_model_dir()
    elif not (path / "config.json").is_file() and (path.exists() or not mc.allow_download):
        loaded = load_model(mc.base, allow_download=mc.allow_download, trust_remote_code=mc.trust_remote_code)
        quantize_in_place(loaded.model, cfg)
        return loaded
    if path.is_dir() and not any(path.glob("*.safetensors")):
        raise ModelError(f"{path}: no .safetensors weights (hone does not load pickled .bin weights)")
    source = str(path) if path.exists() else mc.base
    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=mc.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=quantization_config(cfg), dtype=torch.float32, use_safetensors=True,
        device_map={"": pick_device()}, trust_remote_code=mc.trust_remote_code)
    return Loaded(*_finish(model, tok), description=f"{source} (4-bit NF4)")


def quantize_in_place(model, cfg, keep: list[str] | tuple[str, ...] = ()) -> None:
    """Swap every nn.Linear for a bitsandbytes 4-bit NF4 layer, as transformers' loader does.

    The output head (and modules named in `keep`, e.g. a reward model's score head) stay in full precision,
    as transformers leaves lm_head. For models that come from a method's own loader or a .gguf file.
    """
    import bitsandbytes as bnb

    device = next(model.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear or module is head or name.split(".")[-1] in keep:
            continue
        with torch.device("meta"):
            new = bnb.nn.Linear4bit(module.in_features, module.out_features, module.bias is not None,
                                    compute_dtype(cfg), compress_statistics=cfg.quant.double_quant,
                                    quant_type="nf4")
        new.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False,
                                       **new.weight.__dict__).to(device)
        if module.bias is not None:
            new.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        new.requires_grad_(False)
        model.set_submodule(name, new)
    # What transformers' loader sets: peft reads it to wrap 4-bit layers with its 4-bit LoRA layer.
    model.is_loaded_in_4bit = True


# --- applying and saving adapters -------------------------------------------------------------------------


def apply_weights(model, cfg, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    if cfg.weights == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model

    if cfg.weights == "qlora":
        from peft import prepare_model_for_kbit_training

        # peft's recipe for k-bit bases: freeze them, keep norms in fp32, and (optionally) recompute
        # activations in backward. Non-reentrant checkpointing needs no input-gradient hook.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.quant.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    peft_model = get_peft_model(model, adapter_config(cfg, task_type, modules_to_save))
    if cfg.weights == "prompt":
        # peft warns at every generate() that it drops position_ids for prompt tuning: nothing a user can act
        # on (its positions then count from the first virtual token, as in training).
        warnings.filterwarnings("ignore", message="Position ids are not supported for parameter efficient")
        if cfg.virtual_tokens.init_text:
            init_prompt(peft_model, init_token_ids(cfg, peft_model))
    if cfg.weights == "prefix" and not cfg.virtual_tokens.prefix_projection:
        init_prefix(peft_model, init_token_ids(cfg, peft_model))
    return peft_model


def adapter_config(cfg, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    weights = cfg.weights
    if weights == "ia3":
        # peft's per-architecture defaults (for Llama: k_proj, v_proj and down_proj, the latter scaled on
        # its input), the placement the (IA)3 paper found best.
        return IA3Config(task_type=task_type, modules_to_save=modules_to_save)
    if weights in ("lora", "dora", "qlora"):
        return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=cfg.lora.target_modules, use_dora=weights == "dora",
                          task_type=task_type, modules_to_save=modules_to_save)
    vt = cfg.virtual_tokens
    if weights == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=vt.num_virtual_tokens,
                                  prefix_projection=vt.prefix_projection,
                                  encoder_hidden_size=vt.prefix_projection_size,
                                  modules_to_save=modules_to_save)
    if weights == "prompt":
        # Without init text: embeddings of random vocabulary tokens (Lester et al. 2021 found sampled-vocabulary
        # initialisation far better than random vectors). With it, `init_prompt` overwrites them.
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=vt.num_virtual_tokens,
                                  prompt_tuning_init="SAMPLE_VOCAB", modules_to_save=modules_to_save)
    raise ValueError(f"adapter '{weights}' is not built yet")


def init_token_ids(cfg, peft_model) -> list[int]:
    """The tokens virtual tokens start from: virtual_tokens.init_text's, repeated or cut to fit (peft's TEXT
    initialisation, done here so it needs a tokenizer object rather than a hub path), else random vocabulary
    tokens drawn from the run's seeded RNG (peft's SAMPLE_VOCAB)."""
    n = cfg.virtual_tokens.num_virtual_tokens
    text = cfg.virtual_tokens.init_text
    if not text:
        return torch.randint(0, peft_model.get_input_embeddings().weight.shape[0], (n,)).tolist()
    from hone.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.base, trust_remote_code=cfg.model.trust_remote_code)[0]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise AdapterError(f"virtual_tokens.init_text {text!r} gives no tokens; give some words, or drop it")
    if hasattr(peft_model.active_peft_config, "prompt_tuning_init_text"):
        peft_model.active_peft_config.prompt_tuning_init_text = text  # provenance in adapter_config.json
    return (ids * math.ceil(n / len(ids)))[:n]


def init_prompt(peft_model, ids: list[int]) -> None:
    """Prompt tuning starts from these tokens' input embeddings."""
    encoder = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    with torch.no_grad():
        encoder.weight.copy_(peft_model.get_input_embeddings()(torch.tensor(ids, device=encoder.weight.device)))


def init_prefix(peft_model, ids: list[int]) -> None:
    """Prefix tuning starts from the keys and values the base model computes for these tokens, so at step 0
    the model behaves exactly as if they preceded the text (the prefix-tuning paper's initialisation from
    real words' activations; peft's default, N(0, 1) vectors, starts far off: loss 8 instead of 3 on the
    demo). Keys are stored after the rotary embedding of positions 0..n-1, and the text then sits at
    positions n onward, so the relative positions are those of a real prefix."""
    encoder = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    base = peft_model.get_base_model()
    with torch.no_grad():
        cache = base(input_ids=torch.tensor([ids], device=encoder.weight.device), use_cache=True).past_key_values
        # peft's layout along the embedding: for each layer its keys then its values, each heads x head_dim.
        rows = [t[0].transpose(0, 1).reshape(len(ids), -1) for layer in cache.layers
                for t in (layer.keys, layer.values)]
        encoder.weight.copy_(torch.cat(rows, dim=-1))


def is_adapter(cfg) -> bool:
    return cfg.weights != "full"


def is_prompt_learning(model) -> bool:
    """True for a peft model whose adapter adds virtual tokens (prefix or prompt tuning)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def save_weights(model, tokenizer, cfg, target: Path) -> None:
    from hone.models.load import save_hf_dir

    if is_adapter(cfg):
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
    else:
        save_hf_dir(model, tokenizer, target)


def count_params(model) -> tuple[int, int]:
    """(trainable, total) parameters. A 4-bit weight stores two values per byte, so it counts double."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel() * (2 * p.element_size() if type(p).__name__ == "Params4bit" else 1)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


# --- the loss path for prompt-learning adapters ------------------------------------------------------------


def virtual_token_hidden_states(model, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                                needed: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder's last hidden state at each position of packed rows, computed through peft's forward so
    the virtual tokens take part; shape (rows, row_len, hidden) like a direct decoder call.

    Packed rows cannot go through peft as they are: prompt tuning puts its virtual tokens once at the start
    of a row and drops position_ids (so later examples in the row would neither see the virtual tokens nor
    be kept apart from earlier ones), and prefix tuning's keys sit before the row, outside the block-diagonal
    mask that restarting position_ids give. So each example (a segment whose positions restart at 0) becomes
    its own right-padded row, exactly as it would stand alone at generation time: virtual tokens first, then
    the text at positions num_virtual_tokens onward. Segments with no `needed` position (the padding tail of
    a row) are skipped and their hidden states left at zero. Without position_ids each row is one example
    (right-padded rows need no mask: causal attention never looks at the pads after a token).
    """
    from hone.methods.sft import unwrap

    rows, row_len = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(row_len, device=input_ids.device).expand(rows, row_len)
    if needed is None:
        needed = torch.ones_like(input_ids, dtype=torch.bool)
    spans = [(r, s, e) for r in range(rows) for s, e in segment_bounds(position_ids[r]) if needed[r, s:e].any()]
    if not spans:
        return torch.zeros(rows, row_len, unwrap(model).config.hidden_size, device=input_ids.device)
    width = max(e - s for _, s, e in spans)
    seg_ids = input_ids.new_zeros(len(spans), width)  # right padding: causal attention never looks at it
    real = torch.zeros(len(spans), width, dtype=torch.bool, device=input_ids.device)
    flat = []
    for i, (r, s, e) in enumerate(spans):
        seg_ids[i, :e - s] = input_ids[r, s:e]
        real[i, :e - s] = True
        flat.append(torch.arange(r * row_len + s, r * row_len + e, device=input_ids.device))
    hidden = decoder_output(model, seg_ids)
    hidden = hidden[:, hidden.shape[1] - width:]  # prompt tuning returns its virtual tokens' states first
    out = hidden.new_zeros(rows * row_len, hidden.shape[-1])
    out = out.index_put((torch.cat(flat),), hidden[real])
    return out.view(rows, row_len, -1)


def segment_bounds(positions: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)) of each packed example in a row: a new one starts wherever the position is 0."""
    starts = (positions == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, starts[1:] + [positions.numel()]))


def decoder_output(model, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the peft model's own forward (which adds the virtual tokens) and keep the decoder's last hidden
    state, caught by a hook; the LM head runs on one position only (logits_to_keep=1)."""
    from hone.methods.sft import unwrap

    caught = {}

    def keep(module, args, output):
        caught["hidden"] = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    handle = unwrap(model).get_decoder().register_forward_hook(keep)
    try:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    return caught["hidden"]
