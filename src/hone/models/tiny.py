"""A tiny random Llama and a small byte-level BPE tokenizer, built locally in about a second.

Tests (and anyone trying hone without the embedded model) use this: nothing is downloaded. The tokenizer
has a ChatML chat template and <|im_end|> as end-of-turn/EOS, like the embedded SmolLM2.

    python -m hone.models.tiny OUT_DIR    # writes a loadable HF directory
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Customer support: my order has not arrived, where is my package?",
    "Please reset my password, I cannot log in to my account.",
    "I was charged twice for the same invoice, please fix the billing.",
    "The app crashes when I press the checkout button.",
    "I want to cancel my subscription and get a refund.",
    "user assistant system billing shipping login refund bug cancellation",
    "What is the capital of France? Paris is the capital of France.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 yes no true false red green blue",
]


def build_tokenizer(vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>", unk_token=None)
    fast.chat_template = CHATML
    return fast


def build_model(tokenizer, *, layers: int = 2, hidden: int = 64, heads: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def write_tiny_model(out_dir: str | Path, **kwargs) -> Path:
    """Build and save a tiny model + tokenizer as an HF directory; returns the directory."""
    from hone.models.load import save_hf_dir

    tok = build_tokenizer()
    model = build_model(tok, **kwargs)
    out = Path(out_dir)
    save_hf_dir(model, tok, out)
    return out


def write_tiny_encoder(out_dir: str | Path, *, layers: int = 2, max_positions: int = 64) -> Path:
    """A tiny random BERT sentence encoder + the tiny tokenizer, saved as an HF directory (tests of methods
    and baselines that embed text); returns the directory."""
    from transformers import BertConfig, BertModel

    tok = build_tokenizer()
    config = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=max_positions, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    out = Path(out_dir)
    BertModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m hone.models.tiny OUT_DIR")
    print(write_tiny_model(sys.argv[1]))
