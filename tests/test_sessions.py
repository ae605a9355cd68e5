"""The one ONNX Runtime session factory (smartmixed.contract.sessions): the CPU
path, the CUDA rule on a machine without CUDA, the auto fallback and the typed load error.

No test needs a GPU: a CPU-only build is either the real one or one whose provider list is
patched; the cases that need CUDA to be built in but unusable skip on a build that has CUDA.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from smartmixed.contract.sessions import (
    CPU,
    CUDA,
    ModelLoadError,
    ProviderNotActive,
    ProviderNotInBuild,
    make_session,
)
from smartmixed.serve.models import DeviceError, load_version

REAL_CUDA = CUDA in ort.get_available_providers()
needs_no_cuda = pytest.mark.skipif(REAL_CUDA, reason="this build has CUDA: it may really work")


def _relu_model(*, op: str = "Relu") -> bytes:
    """input (N, 4) -> op -> output (N, 4)."""
    graph = helper.make_graph(
        [helper.make_node(op, ["input"], ["output"])],
        "relu",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


@pytest.fixture
def cpu_only_build(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """This onnxruntime build as one without CUDA, whatever the real one holds."""
    available = [p for p in ort.get_available_providers() if p != CUDA]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    return available


@pytest.fixture
def unusable_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build that lists CUDA while no CUDA works: ORT creates the session on CPU."""
    available = [CUDA, *ort.get_available_providers()]
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)


def test_cpu_session_from_bytes_and_from_a_path(tmp_path: Path) -> None:
    x = np.array([[-1.0, 0.0, 2.0, -3.0]], dtype=np.float32)
    path = tmp_path / "model.onnx"
    path.write_bytes(_relu_model())
    optimized = tmp_path / "optimized.onnx"
    for model in (_relu_model(), path, str(path)):
        session = make_session(
            model, device="cpu", threads=1, optimization="basic", optimized_model_path=optimized
        )
        assert session.get_providers() == [CPU]
        assert session.get_session_options().intra_op_num_threads == 1
        np.testing.assert_array_equal(session.run(None, {"input": x})[0], [[0, 0, 2, 0]])
    assert onnx.load(str(optimized)).graph.node[0].op_type == "Relu"


def test_cuda_on_a_build_without_it_is_a_provider_error(cpu_only_build: list[str]) -> None:
    message = (
        f"CUDAExecutionProvider is not in this onnxruntime build (available: "
        f"{', '.join(cpu_only_build)}); install the gpu extra (onnxruntime-gpu)"
    )
    with pytest.raises(ProviderNotInBuild) as caught:
        make_session(_relu_model(), device="cuda")
    assert str(caught.value) == message


@needs_no_cuda
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_cuda_built_in_but_not_active_is_a_provider_error(unusable_cuda_build: None) -> None:
    with pytest.raises(ProviderNotActive) as caught:
        make_session(_relu_model(), device="cuda")
    assert caught.value.active == [CPU]
    assert str(caught.value) == (
        "CUDAExecutionProvider is in this build but the session runs on "
        "['CPUExecutionProvider'] (CUDA libraries or the GPU not usable)"
    )


def test_auto_without_cuda_falls_back_to_cpu_with_a_warning(
    cpu_only_build: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="smartmixed.contract.sessions"):
        session = make_session(_relu_model(), device="auto", name="mixed/1")
    assert session.get_providers() == [CPU]
    assert [r.getMessage() for r in caplog.records] == [
        "mixed/1: device auto: no CUDAExecutionProvider in this build, "
        "running on ['CPUExecutionProvider']"
    ]


@needs_no_cuda
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_auto_with_unusable_cuda_falls_back_to_cpu_with_a_warning(
    unusable_cuda_build: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="smartmixed.contract.sessions"):
        session = make_session(_relu_model(), device="auto")
    assert session.get_providers() == [CPU]
    assert [r.getMessage() for r in caplog.records] == [
        "session: device auto: CUDA libraries or the GPU not usable, "
        "running on ['CPUExecutionProvider']"
    ]


def test_cpu_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="smartmixed.contract.sessions"):
        make_session(_relu_model(), device="cpu")
    assert caplog.records == []


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (b"garbage", "INVALID_PROTOBUF"),
        (_relu_model(op="NoSuchOp"), "NoSuchOp"),
    ],
    ids=["not onnx", "unknown op"],
)
def test_a_broken_model_is_a_model_load_error(model: bytes, reason: str) -> None:
    with pytest.raises(ModelLoadError) as caught:
        make_session(model, device="cpu")
    assert reason in caught.value.reason and "\n" not in caught.value.reason
    assert str(caught.value) == f"ONNX Runtime cannot load the model ({caught.value.reason})"


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(ValueError, match="device 'gpu': expected one of cpu, cuda, auto"):
        make_session(_relu_model(), device="gpu")  # type: ignore[arg-type]


@needs_no_cuda
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_serve_names_the_version_when_cuda_is_not_active(
    repository: Path, unusable_cuda_build: None
) -> None:
    with pytest.raises(DeviceError) as caught:
        load_version("mixed", repository / "mixed" / "1", device="cuda", threads=1)
    assert str(caught.value) == (
        "mixed/1: --device cuda: CUDAExecutionProvider is in this build but the session runs "
        "on ['CPUExecutionProvider'] (CUDA libraries or the GPU not usable)"
    )
