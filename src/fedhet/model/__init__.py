"""Base models (built-in tiny/SmolLM2, GGUF, local dir, hub id) and LoRA adapters."""

from fedhet.model.base import (
    DEFAULT_MODEL,
    DTYPES,
    TINY_MODEL,
    decoder_layers,
    default_cache_dir,
    load_base_model,
    load_tokenizer,
    model_info,
)

__all__ = [
    "DEFAULT_MODEL",
    "DTYPES",
    "TINY_MODEL",
    "decoder_layers",
    "default_cache_dir",
    "load_base_model",
    "load_tokenizer",
    "model_info",
]
