"""smartmixed.nn: SmartMixed as drop-in layers for any PyTorch model.

    from smartmixed.nn import MixedActivation, freeze

    net = nn.Sequential(nn.Conv2d(1, 8, 3), MixedActivation(8, dim=1), nn.Flatten(),
                        nn.Linear(8 * 26 * 26, 64), MixedActivation(64), nn.Linear(64, 10))
    ...train (selection_logits(net) in their own optimizer group)...
    freeze(net)                      # every MixedActivation -> FrozenMixedActivation (argmax)
    save_frozen(net, "net.safetensors")

Torch only (and the contract's names); train/ builds its networks from these modules.
"""

from __future__ import annotations

from smartmixed.nn.freeze import (
    FrozenFileError,
    assignment,
    freeze,
    frozen_layers,
    load_frozen,
    mixed_layers,
    save_frozen,
    selection_logits,
    set_temperature,
)
from smartmixed.nn.layers import AFUnit, FrozenMixedActivation, MixedActivation

__all__ = [
    "AFUnit",
    "FrozenFileError",
    "FrozenMixedActivation",
    "MixedActivation",
    "assignment",
    "freeze",
    "frozen_layers",
    "load_frozen",
    "mixed_layers",
    "save_frozen",
    "selection_logits",
    "set_temperature",
]
