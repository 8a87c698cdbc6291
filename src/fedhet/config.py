"""Experiment configuration: one YAML file plus ``--set key=value`` overrides.

Every section is a pydantic model with ``extra="forbid"``, so a misspelt key
fails fast with the file and the dotted field named. Sections:

``model`` (base model), ``lora`` (:class:`fedhet.model.lora.LoraSpec`),
``data`` (:class:`fedhet.data.federated.DataConfig`), ``train`` (the default
local training plan), ``strategy`` (name + parameters), ``federation``
(rounds, selection, concurrency, failures), ``fleet``, ``eval``, ``faults``
(injected client faults, :class:`fedhet.runtime.faults.FaultSpec`), ``execution``
(how the simulator runs client updates: :class:`ExecutionConfig`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedhet.data.federated import DataConfig
from fedhet.errors import FedhetError
from fedhet.model.lora import LoraSpec
from fedhet.runtime.checkpoint import write_atomic
from fedhet.runtime.faults import FaultSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """``name``: ``tiny``, ``smollm2-135m``, a local dir, a ``.gguf`` file or a hub id."""

    name: str = "smollm2-135m"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "cpu"


class TrainConfig(_Section):
    """The run's default local training plan (strategies override fields)."""

    steps: int = Field(4, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(3e-4, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float | None = 1.0


class StrategyConfig(_Section):
    name: str = "fedit"
    params: dict[str, Any] = Field(default_factory=dict)


class FederationConfig(_Section):
    """How the runtime drives clients.

    Synchronous strategies run ``rounds`` rounds of ``clients_per_round``
    clients sampled among the online ones. ``over_selection`` samples
    ⌈K(1+o)⌉ and keeps the first K to finish; ``deadline_s`` drops clients
    slower than the deadline (the round then lasts the deadline); ``dropout``
    is the probability that a selected client crashes mid-update (its update
    is lost, its time still counts).

    Asynchronous strategies run until ``max_arrivals`` updates have arrived, in
    one of PROTOCOL v2's two regimes (``regime``; None: the strategy's own,
    ``Strategy.regime``, FedFa's ``full`` and ``bounded`` for the others):

    * ``full``: every online client is in flight from the start, and an arrival
      restarts the same client from the new global model (a random idle online
      client when it has gone offline); ``concurrency`` is not used there, so
      one scenario file serves both regimes;
    * ``bounded``: ``concurrency`` clients in flight; an arrival frees its slot for
      a random idle online client (the arriving one included).

    ``max_virtual_time`` (seconds of virtual clock; sync and async) ends a run at
    the first round or arrival that reaches it, PROTOCOL v2's time budget.

    Every arriving update is validated (:mod:`fedhet.runtime.validation`);
    ``max_staleness`` (versions) and ``max_update_norm`` (L2 norm of the change
    from the client's start state) are its optional bounds.
    """

    rounds: int = Field(5, ge=1)
    clients_per_round: int = Field(5, ge=1)
    over_selection: float = Field(0.0, ge=0)
    deadline_s: float | None = Field(None, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    concurrency: int = Field(8, ge=1)
    max_arrivals: int = Field(40, ge=1)
    regime: Literal["full", "bounded"] | None = None
    max_virtual_time: float | None = Field(None, gt=0)
    checkpoint_every: int = Field(1, ge=1, description="rounds, or arrivals in async mode")
    keep_client_states: bool = Field(
        False,
        description="keep every client's last trained adapter in memory (always on for "
        "strategies with local tensors); costs one adapter per client",
    )
    max_staleness: int | None = Field(None, ge=0)
    max_update_norm: float | None = Field(None, gt=0)
    group_up_mbps: float = Field(1000.0, gt=0, description="group→server link (hier mode)")
    group_down_mbps: float = Field(1000.0, gt=0, description="server→group link (hier mode)")
    lan_mbps: float = Field(
        1000.0, gt=0, description="device↔group-aggregator link, both ways (hier mode)"
    )


class FleetConfig(_Section):
    name: str = "uniform"


class EvalConfig(_Section):
    """Evaluation every ``every`` rounds (async: every ``every`` arrivals).

    ``global_size`` caps the global test set; ``local_clients`` caps how many
    clients' own test splits are evaluated (the first ones by id), each capped at
    ``local_size`` records. ``unseen_clients`` holds the last N clients out of
    training altogether; the global model is evaluated on their data (train and
    test records, capped at ``local_size``), FlexLoRA's unseen-client protocol.
    ``primary`` names the global figure that ``target``, "time to target" and the
    experiment tables refer to (a key of the evaluation rows without ``global_``,
    e.g. ``option_ce``; None: the metric's own). ``target`` is the value defining
    "time to target" (None: not reported), reached from above for the loss-like
    figures (:data:`fedhet.client.evaluate.LOWER_IS_BETTER`) and from below for
    the others; ``stop_at_target`` ends the run at the first evaluation that
    reaches it (PROTOCOL v2's budget).
    """

    every: int = Field(1, ge=1)
    metric: Literal["loss", "accuracy", "exact_match", "rouge"] = "loss"
    global_size: int = Field(64, ge=1)
    local_clients: int = Field(5, ge=0)
    local_size: int = Field(16, ge=1)
    batch_size: int = Field(8, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    unseen_clients: int = Field(0, ge=0)
    primary: str | None = None
    target: float | None = None
    stop_at_target: bool = False
    option_scoring: Literal["sum", "mean"] = "sum"
    """Accuracy: pick the option of largest summed log-likelihood (``sum``), or of
    largest mean log-likelihood per token (``mean``, length-normalised: options of
    different token lengths, e.g. "neutral" vs "very negative", compete fairly)."""


class ExecutionConfig(_Section):
    """How the simulator executes client updates (results do not depend on it,
    up to floating-point reduction order).

    ``lockstep``: train the clients that start together (a synchronous round, a
    hierarchical stage, the first asynchronous dispatches) and follow compatible
    plans in one loop, one forward pass for all (:mod:`fedhet.client.batched`):
    ``true``, ``false``, or ``auto`` (on CUDA devices only: on a CPU the matmuls are
    already near the machine's limit and lockstep gains little, see
    ``benchmarks/RESULTS.md``). ``max_group`` caps the clients per pass and
    ``memory_gb`` (optional) the group's estimated training memory beyond the base
    model (activations, adapters, optimizer state), which then sets the group size.
    ``activation_checkpointing`` recomputes each block's activations in the
    backward pass instead of storing them (less memory, about a third more compute).
    """

    lockstep: bool | Literal["auto"] = "auto"
    max_group: int = Field(32, ge=1)
    memory_gb: float | None = Field(None, gt=0)
    activation_checkpointing: bool = False


class ExperimentConfig(_Section):
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs"
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    fleet: FleetConfig = Field(default_factory=FleetConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    faults: list[FaultSpec] = Field(default_factory=list)
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)

    @model_validator(mode="after")
    def _cross_field_rules(self) -> ExperimentConfig:
        """Rules between sections, checked before anything is loaded or written."""
        from fedhet.strategies import STRATEGIES  # strategies never import the config

        strategy = STRATEGIES.get(self.strategy.name)
        if strategy is None:
            raise ValueError(
                f"strategy.name: unknown strategy {self.strategy.name!r}; "
                f"known: {', '.join(sorted(STRATEGIES))}"
            )
        training = self.data.partition.num_clients - self.eval.unseen_clients
        fed = self.federation
        given = fed.model_fields_set  # a default larger than the fleet is capped, not refused
        per_round = fed.clients_per_round if "clients_per_round" in given else 0
        if strategy.mode == "sync" and per_round > training:
            raise ValueError(
                f"federation.clients_per_round={fed.clients_per_round} exceeds the "
                f"{training} training clients (data.partition.num_clients minus "
                "eval.unseen_clients)"
            )
        if strategy.mode == "hier" and (fed.over_selection or fed.deadline_s is not None):
            raise ValueError(
                "federation.over_selection / federation.deadline_s: not supported by the "
                f"hierarchical strategy {self.strategy.name!r}"
            )
        in_flight = fed.concurrency if "concurrency" in given else 0
        if self.eval.stop_at_target and self.eval.target is None:
            raise ValueError("eval.stop_at_target: needs eval.target")
        if strategy.mode == "async" and in_flight > training:
            raise ValueError(
                f"federation.concurrency={fed.concurrency} exceeds the {training} training clients"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars/lists)."""
    for item in overrides:
        if "=" not in item:
            raise FedhetError(f"--set {item!r}: expected key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise FedhetError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate an experiment file.

    Errors name the file and the line (YAML syntax) or the dotted field.
    """
    path = Path(path)
    if not path.is_file():
        raise FedhetError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "somewhere"
        raise FedhetError(
            f"{path}: invalid YAML at {where}: {getattr(err, 'problem', err)}"
        ) from err
    if not isinstance(raw, dict):
        raise FedhetError(f"{path}: the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    cfg = validate_config(raw, source=str(path))
    return resolve_paths(cfg, path.parent)


def resolve_paths(cfg: ExperimentConfig, folder: Path) -> ExperimentConfig:
    """Relative ``data.path`` / ``data.test_path`` taken from the config file's
    folder when the file is there (else left as given: ``--data-dir``, then the
    working directory, see :func:`fedhet.data.sources.load_source`)."""
    for key in ("path", "test_path"):
        value = getattr(cfg.data, key)
        if value and not Path(value).is_absolute() and (folder / value).is_file():
            setattr(cfg.data, key, str((folder / value).resolve()))
    return cfg


def validate_config(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    """The experiment of ``raw``; every problem becomes one line naming ``source`` and
    the dotted field (with a did-you-mean hint for a misspelt key)."""
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            field = ".".join(str(x) for x in e["loc"]) or "(top level)"
            message = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                message += _did_you_mean(e["loc"])
            where = f"{source}: field {field}" if e["loc"] else source
            lines.append(f"{where}: {message}")
        raise FedhetError("\n".join(lines)) from err


def _did_you_mean(loc: tuple[Any, ...]) -> str:
    """'; did you mean X?' for an unknown key, from the fields of its section."""
    model: Any = ExperimentConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    known = ", ".join(model.model_fields)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {known}"


def dump_config(cfg: ExperimentConfig, path: str | Path) -> None:
    """Write the config as YAML (atomically)."""
    write_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
