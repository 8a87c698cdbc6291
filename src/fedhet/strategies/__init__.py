"""Federated strategies, one per file, all pure (see :mod:`fedhet.strategies.base`).

``STRATEGIES`` maps the registry name used in configs and on the command line
to the class; ``build_strategy`` constructs one from a name and parameters.
"""

from __future__ import annotations

from typing import Any

from fedhet.errors import FedhetError
from fedhet.protocol import ClientInfo, ClientUpdate, Instruction
from fedhet.strategies.base import Strategy, instantiate
from fedhet.strategies.dp_fedavg import DPFedAvg
from fedhet.strategies.fedasync import FedAsync
from fedhet.strategies.fedbuff import FedBuff
from fedhet.strategies.fedex_lora import FedExLoRA
from fedhet.strategies.fedfa import FedFa
from fedhet.strategies.fedit import FedIT
from fedhet.strategies.fedprox import FedProx
from fedhet.strategies.fedsa_lora import FedSALoRA
from fedhet.strategies.fedsvd import FedSVD
from fedhet.strategies.ffa_lora import FFALoRA
from fedhet.strategies.fibecfed import FibecFed
from fedhet.strategies.flexlora import FlexLoRA
from fedhet.strategies.flora import FLoRA
from fedhet.strategies.hetlora import HetLoRA
from fedhet.strategies.hierfedlora import HierFedLoRA
from fedhet.strategies.robust import Robust
from fedhet.strategies.rolora import RoLoRA

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedIT,
        FedProx,
        FFALoRA,
        FedExLoRA,
        FedSALoRA,
        RoLoRA,
        FedSVD,
        FedAsync,
        FedBuff,
        FedFa,
        FibecFed,
        Robust,
        DPFedAvg,
        FlexLoRA,
        FLoRA,
        HetLoRA,
        HierFedLoRA,
    )
}


def build_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    """Instantiate a registered strategy; unknown names or parameters raise
    :class:`FedhetError` naming them."""
    if name not in STRATEGIES:
        raise FedhetError(f"strategy.name: unknown strategy {name!r}; known: {sorted(STRATEGIES)}")
    return instantiate(STRATEGIES[name], params)


__all__ = [
    "STRATEGIES",
    "ClientInfo",
    "ClientUpdate",
    "DPFedAvg",
    "FFALoRA",
    "FedAsync",
    "FedBuff",
    "FedExLoRA",
    "FedFa",
    "FedIT",
    "FedProx",
    "FedSALoRA",
    "FedSVD",
    "FibecFed",
    "FLoRA",
    "FlexLoRA",
    "HetLoRA",
    "HierFedLoRA",
    "Instruction",
    "RoLoRA",
    "Robust",
    "Strategy",
    "build_strategy",
]
