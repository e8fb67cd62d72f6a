"""Tiny random Llama checkpoints for the apply tests, built with transformers from a config (no network)."""

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

D_MODEL = 32
# Small non-weight files a real checkpoint ships; apply must copy each of them byte for byte.
SMALL_FILES = {"tokenizer.json": '{"fake": "tokenizer"}', "tokenizer_config.json": '{"model_max_length": 64}',
               "special_tokens_map.json": "{}", "chat_template.jinja": "{{ messages }}"}


def tiny_llama(dtype: torch.dtype, n_layers: int = 2) -> LlamaForCausalLM:
    """A random Llama with tied embeddings and non-zero biases on every residual writer."""
    config = LlamaConfig(vocab_size=96, hidden_size=D_MODEL, intermediate_size=48, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # biases are zero at init: make every tensor matter
            parameter.normal_(0.0, 0.2)
    return model.to(dtype)


def save_checkpoint(model: LlamaForCausalLM, path: Path, max_shard_size: str = "50GB") -> Path:
    """save_pretrained plus tokenizer-like files and a README (which apply must not copy)."""
    model.save_pretrained(path, max_shard_size=max_shard_size)
    for name, text in SMALL_FILES.items():
        (path / name).write_text(text)
    (path / "README.md").write_text("card of the original model")
    return path
