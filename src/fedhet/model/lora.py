"""LoRA adapters on one shared base model, and adapter states as plain tensors.

An *adapter state* is ``dict[str, Tensor]`` holding LoRA factors (and, for a
global model, base deltas: below), the factors keyed as PEFT saves them
(``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight``), so a state
written with :func:`save_adapter` is a standard PEFT folder.

For a LoRA module with rank r: ``A`` is ``r × d_in``, ``B`` is ``d_out × r`` and
the update is ``ΔW = (alpha / r) · B A``. A state carries its own ranks in its
tensor shapes; the scaling ``alpha / r`` always follows the state's rank.

A global model may also carry a **base delta** per module, key
``<module>.base_delta``: a dense ``d_out × d_in`` matrix E in the units of B·A, so
that the module's weight is ``W0 + (alpha / r) · E`` with r the state's rank of
that module (exact-aggregation methods such as FedEx-LoRA keep there what the
factors cannot hold). :meth:`LoraModel.load_state` applies it to the shared
model exactly (from a kept copy of W0) and restores W0 exactly for a state
without one; :func:`fold_base_delta` turns it into LoRA factors of the rank it
needs for a PEFT folder.

One model, many ranks. :class:`LoraModel` allocates every module at the largest
rank any client will use (``max_rank``). A client of rank r < max_rank is loaded
by zero-padding its factors (rows r: of A and columns r: of B are zero) and
setting that module's scaling to ``alpha / r``. The padded slots then receive
exactly zero gradient (∂L/∂B[:, r:] ∝ A[r:] x = 0 and ∂L/∂A[r:] ∝ B[:, r:]ᵀ g = 0),
so training the padded model is training the rank-r adapter.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from fedhet.errors import FedhetError

AdapterState = dict[str, torch.Tensor]
"""LoRA factors by PEFT key (and base deltas); see the module docstring."""

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
_DELTA_SUFFIX = ".base_delta"


class LoraSpec(BaseModel):
    """LoRA hyper-parameters shared by every client of a run.

    ``rank`` is the default rank; a per-client rank (heterogeneous-rank methods)
    is carried by the client's adapter state. ``max_rank`` is the rank the shared
    model allocates (defaults to ``rank``).
    """

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    dropout: float = Field(0.0, ge=0, lt=1)
    max_rank: int | None = Field(None, ge=1)

    @property
    def allocated_rank(self) -> int:
        return max(self.rank, self.max_rank or self.rank)


# ---------------------------------------------------------------------------
# Pure functions on adapter states
# ---------------------------------------------------------------------------


def module_name(key: str) -> str:
    """The LoRA module a key belongs to (the key without ``.lora_A/B.weight``)."""
    for suffix in (_A_SUFFIX, _B_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    raise ValueError(f"not a LoRA factor key: {key!r}")


def is_lora_a(key: str) -> bool:
    return key.endswith(_A_SUFFIX)


def is_base_delta(key: str) -> bool:
    return key.endswith(_DELTA_SUFFIX)


def delta_key(module: str) -> str:
    """The key of a module's base delta (module docstring)."""
    return module + _DELTA_SUFFIX


def base_deltas(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base deltas of a state, by module."""
    return {k[: -len(_DELTA_SUFFIX)]: v for k, v in state.items() if is_base_delta(k)}


def factors_only(state: Mapping[str, torch.Tensor]) -> AdapterState:
    """The state without its base deltas."""
    return {k: v for k, v in state.items() if not is_base_delta(k)}


def factor_keys(module: str) -> tuple[str, str]:
    """(A key, B key) of a module."""
    return module + _A_SUFFIX, module + _B_SUFFIX


def layer_index(key: str) -> int:
    """Transformer block index of a key (``...layers.<i>...``)."""
    match = _LAYER_RE.search(key)
    if match is None:
        raise ValueError(f"no layer index in key {key!r}")
    return int(match.group(1))


def modules(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names of a state's LoRA factors, in key order, each once."""
    return list(dict.fromkeys(module_name(k) for k in state if not is_base_delta(k)))


def ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Rank of each module, read from the A factor (or B when A is absent)."""
    out: dict[str, int] = {}
    for key, tensor in factors_only(state).items():
        mod = module_name(key)
        out[mod] = tensor.shape[0] if is_lora_a(key) else tensor.shape[1]
    return out


def resize_rank(state: Mapping[str, torch.Tensor], rank: int | Mapping[str, int]) -> AdapterState:
    """Zero-pad or truncate every module's factors to ``rank`` (int or per module).

    Truncation keeps the first r rows of A and columns of B; padding appends
    zeros. The factors are changed, not the scaling: the caller decides which
    ``alpha / r`` applies (FlexLoRA folds it into B, HetLoRA keeps factors).
    """
    out: AdapterState = {}
    for key, tensor in state.items():
        r = rank if isinstance(rank, int) else rank[module_name(key)]
        dim = 0 if is_lora_a(key) else 1
        have = tensor.shape[dim]
        if r <= have:
            out[key] = tensor.narrow(dim, 0, r).clone()
        else:
            pad_shape = list(tensor.shape)
            pad_shape[dim] = r - have
            out[key] = torch.cat([tensor, tensor.new_zeros(pad_shape)], dim=dim)
    return out


def delta_weight(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dense ``ΔW = (alpha / r) B A`` of one module (for tests and small shapes)."""
    return (alpha / a.shape[0]) * (b @ a)


@torch.no_grad()
def fold_base_delta(
    state: Mapping[str, torch.Tensor], alpha: float, tol: float = 1e-6
) -> AdapterState:
    """LoRA factors only, with each module's base delta folded in: the module's
    update (alpha/r)·(B A + E) re-factored by SVD at the rank k it needs (singular
    values above ``tol`` × the largest), B' = (k/r)·U_k S_k, A' = V_kᵀ, so that
    (alpha/k)·B' A' is the same update. k can reach min(d_out, d_in) (a delta
    summing many clients' residuals is full-rank); the adapter is then larger
    than the dense matrix, which is the price of a standard PEFT folder."""
    deltas = base_deltas(state)
    out = factors_only(state)
    state_ranks = ranks(out)
    for mod, delta in deltas.items():
        a_key, b_key = factor_keys(mod)
        r = state_ranks[mod]
        total = out[b_key].double() @ out[a_key].double() + delta.double()
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        k = max(1, int((s > tol * s[0]).sum())) if s.numel() and s[0] > 0 else 1
        out[b_key] = ((k / r) * u[:, :k] * s[:k]).to(out[b_key].dtype)
        out[a_key] = vh[:k].contiguous().to(out[a_key].dtype)
    return out


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def select_layers(state: Mapping[str, torch.Tensor], layers: Iterable[int]) -> AdapterState:
    """The sub-state of the given transformer blocks."""
    wanted = set(layers)
    return {k: v for k, v in state.items() if layer_index(k) in wanted}


def top_layers(num_layers: int, depth: int) -> list[int]:
    """Indices of the top ``depth`` blocks, counted from the output."""
    depth = max(0, min(depth, num_layers))
    return list(range(num_layers - depth, num_layers))


# ---------------------------------------------------------------------------
# The shared model
# ---------------------------------------------------------------------------


class LoraModel:
    """A frozen base model with LoRA modules allocated at ``spec.allocated_rank``.

    Clients are swapped by :meth:`load_state` (copy tensors in place); the
    model object never changes. ``keys`` lists the adapter keys in a fixed order.
    """

    def __init__(self, base: nn.Module, spec: LoraSpec, *, seed: int = 0) -> None:
        self.spec = spec
        self.alpha = spec.alpha
        self.rank = spec.allocated_rank
        config = LoraConfig(
            r=self.rank,
            lora_alpha=spec.alpha,
            target_modules=spec.target_modules,
            lora_dropout=spec.dropout,
            bias="none",
            task_type="CAUSAL_LM",
        )
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self.model: PeftModel = get_peft_model(base, config)
        except ValueError as err:
            raise FedhetError(f"lora.target_modules {spec.target_modules}: {err}") from err
        self._layers: dict[str, nn.Module] = {}
        self._params: dict[str, nn.Parameter] = {}
        for name, module in self.model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                self._layers[name] = module
                a_key, b_key = factor_keys(name)
                self._params[a_key] = module.lora_A["default"].weight
                self._params[b_key] = module.lora_B["default"].weight
        self.keys: list[str] = list(self._params)
        self.modules: list[str] = list(self._layers)
        self.num_layers = 1 + max(layer_index(k) for k in self.keys)
        self._base_copies: dict[str, torch.Tensor] = {}  # W0 of modules holding a base delta

    # -- states -----------------------------------------------------------
    def init_state(self, seed: int, rank: int | Mapping[str, int] | None = None) -> AdapterState:
        """A fresh adapter as PEFT initialises it, reproducible from ``seed``.

        A ~ kaiming-uniform(a=√5) (PEFT's default), B = 0, so ΔW = 0. Clients
        sharing a seed share A exactly (FFA-LoRA relies on it).
        """
        gen = torch.Generator().manual_seed(seed)
        state: AdapterState = {}
        for mod in self.modules:
            a_key, b_key = factor_keys(mod)
            r = self.rank if rank is None else (rank if isinstance(rank, int) else rank[mod])
            d_in = self._params[a_key].shape[1]
            d_out = self._params[b_key].shape[0]
            bound = 1.0 / d_in**0.5  # kaiming_uniform(a=sqrt(5)) bound for fan_in = d_in
            state[a_key] = (torch.rand(r, d_in, generator=gen) * 2 - 1) * bound
            state[b_key] = torch.zeros(d_out, r)
        return state

    def load_state(self, state: Mapping[str, torch.Tensor]) -> None:
        """Copy a (possibly lower-rank) state into the model in place.

        Modules absent from ``state`` are zeroed (ΔW = 0), so a partial state
        never leaks the previous client's tensors. Each module's scaling is
        set to ``alpha / r`` for the state's rank r. A module's base delta E sets
        its weight to W0 + (alpha / r)·E (r: the allocated rank when the state has
        no factors for it); a module without one gets W0 back, bit for bit.
        """
        deltas = base_deltas(state)
        unknown = (set(factors_only(state)) - set(self._params)) | (set(deltas) - set(self._layers))
        if unknown:
            raise KeyError(f"adapter keys not in the model: {sorted(unknown)[:3]}")
        state_ranks = ranks(state)
        for mod, r in state_ranks.items():
            if r > self.rank:
                raise ValueError(f"rank {r} of {mod} exceeds the allocated rank {self.rank}")
        for mod, delta in deltas.items():
            shape = self._layers[mod].base_layer.weight.shape
            if delta.shape != shape:
                raise ValueError(f"base delta of {mod}: shape {tuple(delta.shape)}, "
                                 f"the weight's is {tuple(shape)}")
        self._set_base(deltas, state_ranks)
        with torch.no_grad():
            for mod in self.modules:
                a_key, b_key = factor_keys(mod)
                pa, pb = self._params[a_key], self._params[b_key]
                pa.zero_()
                pb.zero_()
                r = state_ranks.get(mod)
                if r is None:
                    continue
                if a_key in state:
                    pa[:r].copy_(state[a_key])
                if b_key in state:
                    pb[:, :r].copy_(state[b_key])
                self._layers[mod].scaling["default"] = self.alpha / r

    @torch.no_grad()
    def _set_base(self, deltas: Mapping[str, torch.Tensor], state_ranks: Mapping[str, int]) -> None:
        for mod in set(self._base_copies) - set(deltas):  # back to W0 exactly
            self._layers[mod].base_layer.weight.copy_(self._base_copies.pop(mod))
        for mod, delta in deltas.items():
            weight = self._layers[mod].base_layer.weight
            if mod not in self._base_copies:
                self._base_copies[mod] = weight.detach().clone()
            scale = self.alpha / state_ranks.get(mod, self.rank)
            w0 = self._base_copies[mod]
            weight.copy_((w0.double() + scale * delta.to(weight.device).double()).to(w0.dtype))

    def restore_base(self) -> None:
        """The base weights back to W0 (after a run that applied base deltas)."""
        self._set_base({}, {})

    def state(self, rank: Mapping[str, int] | None = None) -> AdapterState:
        """A detached CPU copy of the model's adapter, truncated to ``rank``
        per module (default: each module's current rank from its scaling)."""
        out: AdapterState = {}
        for mod in self.modules:
            r = rank[mod] if rank is not None else self.current_rank(mod)
            a_key, b_key = factor_keys(mod)
            out[a_key] = self._params[a_key][:r].detach().to("cpu", copy=True)
            out[b_key] = self._params[b_key][:, :r].detach().to("cpu", copy=True)
        return out

    def current_rank(self, mod: str) -> int:
        return round(self.alpha / self._layers[mod].scaling["default"])

    # -- training configuration ---------------------------------------------
    def parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA parameters by key (the model's own tensors)."""
        return dict(self._params)

    def set_trainable(
        self, layers: Iterable[int] | None = None, frozen: Iterable[str] = ()
    ) -> dict[str, nn.Parameter]:
        """Make exactly the LoRA parameters of ``layers`` (all when None) trainable,
        except factors named in ``frozen`` (``"lora_A"`` / ``"lora_B"``).

        Blocks below the lowest trainable one get no ``requires_grad`` tensor, so
        autograd does not backpropagate through them: the compute saving of
        depth-limited training is real, not only a parameter count.
        Returns the trainable parameters by key.
        """
        wanted = None if layers is None else set(layers)
        frozen = tuple(frozen)
        trainable: dict[str, nn.Parameter] = {}
        for key, param in self._params.items():
            on = (wanted is None or layer_index(key) in wanted) and not any(
                f".{name}." in key for name in frozen
            )
            param.requires_grad_(on)
            if on:
                trainable[key] = param
        return trainable


# ---------------------------------------------------------------------------
# PEFT folders
# ---------------------------------------------------------------------------


def save_adapter(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    spec: LoraSpec,
    base_model_name: str | None = None,
) -> Path:
    """Write ``state`` as a standard PEFT folder (``adapter_config.json`` +
    ``adapter_model.safetensors``), loadable with ``PeftModel.from_pretrained``.

    Heterogeneous ranks are written through PEFT's ``rank_pattern`` and
    ``alpha_pattern`` so that PEFT's scaling equals ``spec.alpha / r`` per module.
    Base deltas are folded into the factors first (:func:`fold_base_delta`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = fold_base_delta(state, spec.alpha)
    state_ranks = ranks(state)
    default_rank = max(set(state_ranks.values()), key=list(state_ranks.values()).count)
    pattern = {_pattern_name(m): r for m, r in state_ranks.items() if r != default_rank}
    config = LoraConfig(
        r=default_rank,
        lora_alpha=spec.alpha,
        target_modules=spec.target_modules,
        lora_dropout=spec.dropout,
        rank_pattern=pattern,
        alpha_pattern={name: spec.alpha for name in pattern},
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:  # written beside, then swapped in: a reader never sees half a folder
        config.save_pretrained(str(tmp))
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()},
            str(tmp / "adapter_model.safetensors"),
        )
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_adapter(path: str | Path) -> tuple[AdapterState, dict]:
    """Read a PEFT folder: (state, adapter_config as a dict)."""
    path = Path(path)
    weights = path / "adapter_model.safetensors"
    config = path / "adapter_config.json"
    for needed in (weights, config):
        if not needed.is_file():
            raise FedhetError(f"{needed}: missing (not a PEFT adapter folder)")
    return load_file(str(weights)), json.loads(config.read_text())


def _pattern_name(module: str) -> str:
    """PEFT matches rank_pattern keys against module names without the
    ``base_model.model.`` prefix."""
    prefix = "base_model.model."
    return module[len(prefix) :] if module.startswith(prefix) else module
