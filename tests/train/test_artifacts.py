"""train/artifacts.py: a layered (conv) run's weights are checked against its spec before any
network is built, as an MLP's are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from smartmixed import contract
from smartmixed.train.artifacts import ArtifactError, load_model, save_model, weight_shapes


def _lenet_spec() -> contract.ModelSpec:
    pool = ["relu", "afu"]
    return contract.ModelSpec.untrained(
        pool=pool,
        assignment=[[pool[j % 2] for j in range(width)] for width in (6, 16, 120, 84)],
        layers=contract.resolve_conv_preset("lenet5"),
        input_shape=[1, 28, 28],
    )


def test_weight_shapes_of_a_layered_spec_name_its_layers_and_units() -> None:
    spec = _lenet_spec()
    units = spec.afu["units"]
    afu = {
        f"afu.{layer}.{param}": (1,) if param == "b1" else (units,)
        for layer in range(4)
        for param in ("w0", "b0", "w1", "b1")
    }
    assert weight_shapes(spec) == contract.layered_weight_shapes(spec.layers, [1, 28, 28]) | afu
    assert weight_shapes(spec)["layers.2.weight"] == (16, 6, 5, 5)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda state: state.pop("layers.7.bias"),
            "weights do not match the architecture: missing tensor(s) layers.7.bias",
        ),
        (
            lambda state: state.__setitem__("layers.0.weight", torch.zeros(6, 1, 3, 3)),
            "tensor layers.0.weight: expected shape [6, 1, 5, 5], got [6, 1, 3, 3]",
        ),
        (
            # an MLP's numbering (i counting the Linear layers) is not the layered spec's
            lambda state: state.__setitem__("layers.3.weight", torch.zeros(10, 84)),
            "weights do not match the architecture: unexpected tensor(s) layers.3.weight",
        ),
    ],
)
def test_layered_weights_that_do_not_fit_the_spec_are_refused(
    tmp_path: Path, change, message: str
) -> None:
    spec = _lenet_spec()
    state = {name: torch.zeros(shape) for name, shape in weight_shapes(spec).items()}
    change(state)
    save_model(tmp_path, spec, state)
    with pytest.raises(ArtifactError) as error:
        load_model(tmp_path)
    assert str(error.value) == f"{tmp_path / contract.MODEL_WEIGHTS}: {message}"
