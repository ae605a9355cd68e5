"""The gRPC endpoint (inference.GRPCInferenceService): its declaration against Triton's, and a
real ``smartmixed-serve`` process driven by tritonclient.grpc and a raw grpc channel."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tritonclient.grpc import service_pb2 as triton_pb2

from smartmixed.serve import grpc_service_pb2 as ours_pb2

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ("grpc_service_pb2.py", "grpc_service_pb2_grpc.py")


# --------------------------------------------------------------------------------------------
# The declaration


def test_generated_modules_are_what_make_proto_writes(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools missing: pip install -e '.[dev]'")
    if shutil.which("make") is None:
        pytest.skip("make missing")
    result = subprocess.run(
        ["make", "-s", "proto", f"PROTO_OUT={tmp_path}", f"BIN={Path(sys.executable).parent}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    for name in GENERATED:
        assert (tmp_path / name).read_bytes() == (ROOT / "serve" / name).read_bytes(), (
            f"serve/{name} is not what `make proto` writes from serve/grpc_service.proto"
        )


def _fields(message) -> dict[str, tuple]:
    def kind(f) -> str | None:
        named = f.message_type or f.enum_type
        if named is None:
            return None
        if named.GetOptions().map_entry:  # map<K, V>: compare the key and value types
            return "map:" + ",".join(str(_fields(named)[k]) for k in ("key", "value"))
        return named.full_name

    return {
        f.name: (
            f.number,
            f.type,
            f.is_repeated,
            kind(f),
            f.containing_oneof.name if f.containing_oneof else None,
        )
        for f in message.fields
    }


def test_service_and_messages_are_tritons() -> None:
    """Every RPC, message and field of serve/grpc_service.proto is Triton's (name, number, type,
    label, oneof) but ModelConfigResponse.config, bytes on our side (the same wire bytes)."""
    ours = ours_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert len(ours.methods) == 11
    pending = []
    for method in ours.methods:
        their = theirs.methods_by_name[method.name]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            their.input_type.full_name,
            their.output_type.full_name,
        )
        assert not their.server_streaming and not their.client_streaming
        pending += [method.input_type, method.output_type]
    seen = set()
    while pending:
        message = pending.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        their = triton_pb2.DESCRIPTOR.pool.FindMessageTypeByName(message.full_name)
        expected = _fields(their)
        if message.full_name == "inference.ModelConfigResponse":
            config = their.fields_by_name["config"]
            assert config.message_type.full_name == "inference.ModelConfig"
            expected["config"] = (1, config.TYPE_BYTES, False, None, None)
        assert _fields(message) == expected, message.full_name
        pending += [f.message_type for f in message.fields if f.message_type]
    assert len(seen) > 30
    # a pool of its own: importing tritonclient.grpc beside it (as here) works
    assert ours_pb2.DESCRIPTOR.pool is not triton_pb2.DESCRIPTOR.pool
