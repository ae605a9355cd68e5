"""Tiny models written into a model repository the way smartmixed-export writes them, built here
without train/ or export/: a torch module, torch's ONNX exporter, the contract's metadata keys,
Triton's config.pbtxt.

``TinyConvNet`` reads (N, 1, S, S) raw grey levels (0-255); its spec describes it with
``layers`` (conv 3 k3 -> maxpool 2 -> flatten -> linear 5 -> linear 10), each hidden channel and
neuron with its own activation (relu or tanh), applied as ``assignment`` names them.
``TinyMLP`` reads (N, S*S) rows: a spec without ``layers``, as every MLP before conv nets.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from smartmixed.contract import (
    CONFIG_FILE,
    INPUT,
    LOGITS,
    META_LOWERING,
    META_PRECISION,
    META_SPEC,
    MODEL_FILE,
    OUTPUTS,
    PLATFORM,
    PROBABILITIES,
    ModelSpec,
)

SCALE = 1 / 255  # raw grey levels 0..255 -> [0, 1], inside the graph as export puts it
CLASSES = 10
LAYERS = [
    {"type": "conv", "channels": 3, "kernel": 3, "stride": 1, "padding": 0},
    {"type": "maxpool", "kernel": 2, "stride": 2},
    {"type": "flatten"},
    {"type": "linear", "features": 5},
    {"type": "linear", "features": CLASSES},
]
CONV_ACTIVATIONS = ["relu", "tanh", "relu"]  # per channel of the conv
HIDDEN_ACTIVATIONS = ["tanh", "relu", "relu", "tanh", "relu"]  # per neuron of linear 5
LOWERING = "torch.onnx.export"


def _mixed(z: torch.Tensor, tanh: torch.Tensor) -> torch.Tensor:
    """Each feature's own activation: tanh where ``tanh`` (broadcast over z) is set, else relu."""
    return torch.where(tanh, torch.tanh(z), torch.relu(z))


class TinyConvNet(nn.Module):
    """(N, 1, S, S) raw values -> (logits, probabilities), both (N, 10)."""

    def __init__(self, side: int, *, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        pooled = (side - 2) // 2  # conv k3 without padding, then maxpool 2
        self.conv = nn.Conv2d(1, 3, 3)
        self.hidden = nn.Linear(3 * pooled * pooled, 5)
        self.out = nn.Linear(5, CLASSES)
        conv_tanh = torch.tensor([a == "tanh" for a in CONV_ACTIVATIONS]).view(1, 3, 1, 1)
        self.register_buffer("conv_tanh", conv_tanh)
        self.register_buffer("hidden_tanh", torch.tensor([a == "tanh" for a in HIDDEN_ACTIVATIONS]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = _mixed(self.conv(x * SCALE), self.conv_tanh)  # (N, 3, S-2, S-2), per channel
        z = nn.functional.max_pool2d(z, 2).flatten(1)  # (N, 3 * ((S-2)//2)**2)
        logits = self.out(_mixed(self.hidden(z), self.hidden_tanh))  # (N, 10)
        return logits, logits.softmax(1)


class TinyMLP(nn.Module):
    """(N, D) raw values -> (logits, probabilities): D -> 4 relu -> 10."""

    def __init__(self, features: int, *, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden, self.out = nn.Linear(features, 4), nn.Linear(4, CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.out(torch.relu(self.hidden(x * SCALE)))
        return logits, logits.softmax(1)


def conv_spec(side: int, **changes: Any) -> dict[str, Any]:
    """The spec of ``TinyConvNet(side)``: arch [S*S, 3 channels, 5 neurons, 10 classes]."""
    spec = ModelSpec(
        arch=[side * side, 3, 5, CLASSES],
        pool=["relu", "tanh"],
        mode="smartmixed",
        assignment=[CONV_ACTIVATIONS, HIDDEN_ACTIVATIONS],
        preprocessing={"offset": 0.0, "scale": SCALE},
        input_shape=[1, side, side],
        labels=[str(i) for i in range(CLASSES)],
        layers=LAYERS,
    )
    return spec.to_dict() | changes


def mlp_spec(features: int, *, input_shape: list[int]) -> dict[str, Any]:
    """The spec of ``TinyMLP(features)``: no layers, arch [D, 4, 10]."""
    spec = ModelSpec(
        arch=[features, 4, CLASSES],
        pool=["relu"],
        mode="fixed:relu",
        assignment=[["relu"] * 4],
        preprocessing={"offset": 0.0, "scale": SCALE},
        input_shape=input_shape,
        labels=[str(i) for i in range(CLASSES)],
    )
    return spec.to_dict()


def triton_config(name: str, dims: list[int], *, max_batch_size: int = 8) -> str:
    """config.pbtxt as export writes it (dims exclude the batch), with dynamic batching."""
    outputs = ",\n".join(
        f'  {{ name: "{out}" data_type: TYPE_FP32 dims: [ {CLASSES} ] }}' for out in OUTPUTS
    )
    return (
        f'name: "{name}"\nplatform: "{PLATFORM}"\nmax_batch_size: {max_batch_size}\n'
        f'input [\n  {{ name: "{INPUT}" data_type: TYPE_FP32 dims: [ {", ".join(map(str, dims))} ] }}\n]\n'
        f"output [\n{outputs}\n]\n"
        "dynamic_batching { }\n"
    )


def onnx_model(module: nn.Module, input_dims: list[int], spec: dict[str, Any]) -> onnx.ModelProto:
    """``module`` through torch's ONNX exporter (input "input" [batch, *input_dims], outputs
    logits and probabilities [batch, 10]), with the metadata serve reads."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter announces its retirement
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.zeros(2, *input_dims),),
            buffer,
            dynamo=False,
            input_names=[INPUT],
            output_names=[LOGITS, PROBABILITIES],
            dynamic_axes={name: {0: "batch"} for name in (INPUT, *OUTPUTS)},
            opset_version=17,
        )
    model = onnx.load_model_from_string(buffer.getvalue())
    for key, value in {META_SPEC: spec, META_LOWERING: LOWERING, META_PRECISION: "fp32"}.items():
        text = value if isinstance(value, str) else json.dumps(value)
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=text))
    return model


def write_entry(
    root: Path,
    name: str,
    module: nn.Module,
    spec: dict[str, Any],
    *,
    input_dims: list[int],
    config_dims: list[int] | None = None,
) -> Path:
    """ROOT/NAME/config.pbtxt and ROOT/NAME/1/model.onnx; returns the model file's path.
    ``config_dims``: what config.pbtxt states (default: the graph's ``input_dims``)."""
    model = onnx_model(module, input_dims, spec)
    path = root / name / "1" / MODEL_FILE
    path.parent.mkdir(parents=True)
    path.write_bytes(model.SerializeToString())
    (root / name / CONFIG_FILE).write_text(triton_config(name, config_dims or input_dims))
    return path
