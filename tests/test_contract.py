"""The stages' contract (smartmixed.contract): torch stays out of lowering and serving, and the
names it holds are the ones export writes and serve reads."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from smartmixed import contract
from smartmixed.export.lower import lower, set_metadata
from smartmixed.export.repository import triton_config
from smartmixed.serve.runtime import load_repository
from smartmixed.train.model import MixedMLP
from smartmixed.train.pool import ACTIVATIONS

HEAVY = ("torch", "sklearn", "safetensors")


@pytest.mark.parametrize(
    "modules",
    [
        "smartmixed.contract",
        "smartmixed.export.lower",
        "smartmixed.serve.app",
        "smartmixed.export.lower, smartmixed.serve.app, smartmixed.train",
    ],
)
def test_lowering_and_serving_import_no_torch(modules: str) -> None:
    code = (
        f"import sys, {modules}\n"
        f"loaded = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_serve_imports_neither_train_nor_export() -> None:
    code = (
        "import sys, smartmixed.serve.app, smartmixed.serve.cli\n"
        "bad = [m for m in sys.modules if m.startswith(('smartmixed.train', 'smartmixed.export'))]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_lazy_train_exports_resolve() -> None:
    import smartmixed.train as train

    for name in train.__all__:
        assert getattr(train, name) is not None
    assert train.ModelSpec is contract.ModelSpec and train.PRESETS is contract.PRESETS
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = train.nothing


def test_pool_registry_matches_the_contract_names() -> None:
    # one torch activation per contract name, in the contract's order (logit index = position)
    assert tuple(ACTIVATIONS) == contract.ACTIVATION_NAMES
    assert contract.DEFAULT_POOL + contract.EXTRA_ACTIVATIONS == contract.ACTIVATION_NAMES


def test_exported_graph_uses_the_contract_names_and_serve_reads_them(tmp_path: Path) -> None:
    spec = contract.ModelSpec(
        arch=[6, 8, 3],
        pool=list(contract.DEFAULT_POOL),
        mode="smartmixed",
        assignment=[[*contract.DEFAULT_POOL, "relu", "selu"]],
        preprocessing={"offset": 0.0, "scale": 1.0},
        input_shape=[6],
        labels=["a", "b", "c"],
    )
    torch.manual_seed(0)
    model = MixedMLP.from_spec(spec).eval()
    state = {k: v.numpy() for k, v in model.canonical_state_dict().items()}
    proto = lower(spec, state, lowering="permuted")
    assert [i.name for i in proto.graph.input] == [contract.INPUT]
    assert tuple(o.name for o in proto.graph.output) == contract.OUTPUTS
    set_metadata(proto, {contract.META_SPEC: spec.to_dict(), contract.META_LOWERING: "permuted"})

    entry = tmp_path / "mixed"
    (entry / "1").mkdir(parents=True)
    (entry / "1" / contract.MODEL_FILE).write_bytes(proto.SerializeToString())
    config = triton_config("mixed", spec, lowering="permuted")
    (entry / contract.CONFIG_FILE).write_text(config)

    repository = load_repository(tmp_path, device="cpu", threads=1, skip_bad_models=False)
    served = repository.get("mixed")
    assert served.outputs == list(contract.OUTPUTS)
    assert served.labels == spec.labels  # read back from contract.META_SPEC
    assert served.describe()["lowering"] == "permuted"  # from contract.META_LOWERING
    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    got = served.predict(x)[contract.PROBABILITIES]
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_package_versions() -> None:
    assert contract.package_version("numpy") == np.__version__
    assert contract.package_version("no-such-distribution-smartmixed") == "unknown"
    assert contract.package_versions(["numpy"]) == {"numpy": np.__version__}


def test_split_list() -> None:
    assert contract.split_list(" relu, tanh,,elu ") == ["relu", "tanh", "elu"]
    assert contract.split_list(["relu", " tanh", ""]) == ["relu", "tanh"]
    assert contract.split_list(",") == []


def test_call_with_options_takes_keywords_from_the_parsed_options() -> None:
    def measure(*, arch: str | None = None, seed: int = 0, rows: int = 3) -> tuple:
        return arch, seed, rows

    # an option at None or unknown to the function keeps its default; given keywords win
    args = argparse.Namespace(arch=None, seed=7, out="x", rows=5)
    assert contract.call_with_options(measure, args) == (None, 7, 5)
    assert contract.call_with_options(measure, args, rows=1, arch="64,10") == ("64,10", 7, 1)
