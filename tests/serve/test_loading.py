"""Loading a model repository: bad entries, version folders, config.pbtxt."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from tritonclient.grpc import model_config_pb2

from smartmixed.serve import model_config
from smartmixed.serve.cli import main
from smartmixed.serve.model_config import ConfigError, check_model_config
from smartmixed.serve.models import LoadError, NotReady, load_repository


@pytest.fixture
def models(repository: Path, tmp_path: Path) -> Path:
    """A copy of the session's repository (mixed, relu), to damage."""
    return Path(shutil.copytree(repository, tmp_path / "models"))


def _load(root: Path, **options):
    options = {"device": "cpu", "threads": 1, "skip_bad_models": False, **options}
    return load_repository(root, **options)


# --------------------------------------------------------------------------------------------
# Bad entries: one line naming model, version and problem; --skip-bad-models serves the rest


def _model(models: Path) -> bytes:
    return (models / "mixed" / "1" / "model.onnx").read_bytes()


def _nan_weights(models: Path) -> bytes:
    proto = onnx.load_model_from_string(_model(models))
    weight = next(t for t in proto.graph.initializer if t.name.endswith("/W"))
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[:3] = np.nan
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    return proto.SerializeToString()


BAD_MODEL_FILES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    # name: (damage(model.onnx path, repository), the problem after "broken/1: ")
    "truncated": (lambda p, m: p.write_bytes(_model(m)[:1000]), "not an ONNX model"),
    "random bytes": (
        lambda p, m: p.write_bytes(np.random.default_rng(0).bytes(4096)),
        "not an ONNX model",
    ),
    "empty": (lambda p, m: p.write_bytes(b""), "empty file"),
    "missing": (lambda p, m: None, "file not found"),
    "symlink to a system file": (
        lambda p, m: p.symlink_to("/etc/passwd"),
        "it resolves to /etc/passwd, outside the repository",
    ),
    "symlink to an endless device": (
        lambda p, m: p.symlink_to("/dev/zero"),
        "it resolves to /dev/zero, outside the repository",
    ),
    "FIFO": (lambda p, m: os.mkfifo(p), "a FIFO, not a regular file"),
    "directory": (lambda p, m: p.mkdir(), "a directory, not a regular file"),
    "symlink loop": (lambda p, m: p.symlink_to(p.name), "Symlink loop"),
    "NaN weights": (lambda p, m: p.write_bytes(_nan_weights(m)), "holds 3 NaN values"),
}


@pytest.mark.parametrize("case", BAD_MODEL_FILES)
def test_a_bad_model_file_is_one_line_and_can_be_skipped(models: Path, case: str) -> None:
    damage, problem = BAD_MODEL_FILES[case]
    (models / "broken" / "1").mkdir(parents=True)
    damage(models / "broken" / "1" / "model.onnx", models)
    with pytest.raises(LoadError) as refused:
        _load(models)
    message = str(refused.value)
    assert message.startswith("broken/1: ") and problem in message and "\n" not in message

    repo = _load(models, skip_bad_models=True)
    assert sorted(repo.models) == ["mixed", "relu"] and repo.failed == {"broken": message}
    with pytest.raises(NotReady, match="model 'broken' is not ready: broken/1: "):
        repo.get("broken")
    served = repo.get("relu").predict(np.zeros((2, 64), np.float32))
    assert served["probabilities"].shape == (2, 10)


def test_a_model_file_over_the_size_limit(models: Path) -> None:
    with pytest.raises(
        LoadError,
        match=r"^mixed/1: cannot read .*model\.onnx: \d+ bytes, more than the "
        r"limit of 2048 bytes \(SMARTMIXED_MAX_MODEL_BYTES\)$",
    ):
        _load(models, max_model_bytes=2048)
    assert _load(models, skip_bad_models=True, max_model_bytes=2048).models == {}


def test_version_folders_are_positive_ascii_integers(models: Path, caplog) -> None:
    for name in ("²", "0", "01", "v2", "latest"):  # "²".isdigit() is True; int("²") raises
        shutil.copytree(models / "relu" / "1", models / "relu" / name)
    (models / "relu" / ".staging").mkdir()  # hidden: ignored without a word
    with caplog.at_level(logging.WARNING, logger="smartmixed.serve"):
        repo = _load(models)
    assert sorted(repo.models["relu"]) == ["1"] and not repo.failed
    ignored = sorted(r.getMessage().split("'")[1] for r in caplog.records)
    assert ignored == ["0", "01", "latest", "v2", "²"]
    assert "version folders are named 1, 2, 3" in caplog.records[0].getMessage()

    shutil.move(models / "relu" / "1", models / "relu" / "\u0661")  # Arabic-Indic digit one
    with pytest.raises(LoadError, match=r"^relu: no version folder \(1, 2, \.\.\.\) in "):
        _load(models)
    assert sorted(_load(models, skip_bad_models=True).failed) == ["relu"]


def test_version_policy_chooses_the_versions_served(models: Path) -> None:
    for version in ("2", "10"):
        shutil.copytree(models / "relu" / "1", models / "relu" / version)
    shutil.copytree(models / "mixed" / "1", models / "mixed" / "3")
    config = models / "relu" / "config.pbtxt"
    text = config.read_text()
    assert "version_policy: { latest: { num_versions: 1 } }" in text  # as export writes it
    (models / "mixed" / "config.pbtxt").unlink()  # no config: Triton's default, latest 1
    repo = _load(models)
    assert sorted(repo.models["relu"]) == ["10"] and sorted(repo.models["mixed"]) == ["3"]
    for policy, served in (
        ("latest: { num_versions: 2 }", ["10", "2"]),
        ("all: {}", ["1", "10", "2"]),
        ("specific: { versions: [1, 2] }", ["1", "2"]),
    ):
        config.write_text(text.replace("latest: { num_versions: 1 }", policy))
        assert sorted(_load(models).models["relu"]) == served, policy
    config.write_text(text.replace("latest: { num_versions: 1 }", "specific: { versions: [7] }"))
    with pytest.raises(LoadError, match="version_policy selects none"):
        _load(models)


def test_repository_itself_missing_empty_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match=r"^model repository .*nowhere does not exist$"):
        _load(tmp_path / "nowhere", skip_bad_models=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match=r"holds no model \(expected NAME/VERSION/model\.onnx\)$"):
        _load(tmp_path / "empty", skip_bad_models=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(LoadError, match=r"^model repository .*file is not a directory$"):
        _load(tmp_path / "file", skip_bad_models=True)


def test_cli_reports_a_bad_repository_in_one_line_before_serving(
    models: Path, tmp_path: Path, capsys
) -> None:
    def serve(*argv: str) -> str:
        assert main(["--port", "0", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        return err

    assert serve("--repository", str(tmp_path / "nowhere")) == (
        f"smartmixed-serve: error: model repository {tmp_path / 'nowhere'} does not exist\n"
    )
    (models / "mixed" / "config.pbtxt").write_text("name: [\n")
    assert serve("--repository", str(models)).startswith(
        f"smartmixed-serve: error: mixed/1: {models / 'mixed' / 'config.pbtxt'}:1:7: "
    )


def test_the_command_exits_2_without_a_traceback(models: Path) -> None:
    (models / "relu" / "1" / "model.onnx").unlink()
    (models / "relu" / "1" / "model.onnx").symlink_to("/dev/zero")
    result = subprocess.run(
        [sys.executable, "-m", "smartmixed.serve", "--repository", str(models), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.splitlines()[-1] == (
        f"smartmixed-serve: error: relu/1: cannot read {models / 'relu' / '1' / 'model.onnx'}: "
        f"it resolves to /dev/zero, outside the repository {models}"
    )


# --------------------------------------------------------------------------------------------
# config.pbtxt


def test_declared_model_config_is_tritons(models: Path) -> None:
    """Every message, field (name, number, type, label, oneof) and enum value declared in
    serve/model_config.py is the one of Triton's model_config.proto (as tritonclient has it)."""

    def signature(message) -> dict[str, tuple]:
        def kind(f) -> str | None:
            named = f.message_type or f.enum_type
            return named.full_name if named else None

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

    pending, seen = [model_config.ModelConfig.DESCRIPTOR], set()
    while pending:
        ours = pending.pop()
        if ours.full_name in seen:
            continue
        seen.add(ours.full_name)
        theirs = model_config_pb2.DESCRIPTOR.pool.FindMessageTypeByName(ours.full_name)
        expected = signature(theirs)
        if ours.full_name == "inference.ModelConfig":
            expected = {k: v for k, v in expected.items() if k not in model_config.UNSUPPORTED}
            assert set(signature(theirs)) - set(expected) == model_config.UNSUPPORTED
        assert signature(ours) == expected, ours.full_name
        for field in ours.fields:
            if field.message_type:
                pending.append(field.message_type)
            if field.enum_type:
                assert [(v.name, v.number) for v in field.enum_type.values] == [
                    (v.name, v.number)
                    for v in model_config_pb2.DESCRIPTOR.pool.FindEnumTypeByName(
                        field.enum_type.full_name
                    ).values
                ]
    assert len(seen) > 30  # map entries and nested messages included


def test_export_config_is_read_and_exposed(models: Path) -> None:
    repo = _load(models)
    config = repo.get("mixed").config
    assert config == model_config.ModelConfigInfo(
        source=models / "mixed" / "config.pbtxt",
        max_batch_size=1024,
        dynamic_batching=True,
        max_queue_delay_s=None,  # export states no delay: the server's own applies
        preferred_batch_sizes=(),
    )
    (models / "relu" / "config.pbtxt").unlink()  # none: derived from the model (Triton's auto)
    assert _load(models).get("relu").config == model_config.NO_CONFIG
    assert model_config.NO_CONFIG.source is None


CONFIG_PROBLEMS = {
    # edit of the exported config.pbtxt: what the one-line error says after "FILE"
    "garbage": (lambda t: "\x00\xff garbage {{", ":1:1: '\\x00\\xff garbage {{': Expected"),
    # appended as the line after the exported config's last ("{LINE}": that line's number)
    "unknown field": (
        lambda t: t + "foo: 3\n",
        ':{LINE}:1: Message type "inference.ModelConfig" has no field named "foo".',
    ),
    "unsupported field": (
        lambda t: t + "sequence_batching { }\n",
        ":{LINE}:1: sequence_batching: a Triton setting smartmixed does not support",
    ),
    "negative delay": (
        lambda t: t.replace("batching { }", "batching { max_queue_delay_microseconds: -5 }"),
        "out of range",
    ),
    "two version policies": (
        lambda t: t.replace("latest: { num_versions: 1 }", "latest {} all {}"),
        'another member of oneof "policy_choice"',
    ),
    "wrong name": (
        lambda t: t.replace('"mixed"', '"other"'),
        ": name 'other' is not the model folder's name 'mixed'",
    ),
    "wrong platform": (
        lambda t: t.replace("onnxruntime_onnx", "tensorrt_plan"),
        ": platform 'tensorrt_plan': smartmixed serves 'onnxruntime_onnx' only",
    ),
    "wrong dims": (
        lambda t: t.replace("dims: [ 64 ]", "dims: [ 65 ]"),
        ": input 'input': dims [65] do not match the ONNX model's [64], without the batch "
        "dimension (max_batch_size 1024)",
    ),
    "batch dim included": (
        lambda t: t.replace("dims: [ 64 ]", "dims: [ -1, 64 ]"),
        ": input 'input': dims [-1, 64] do not match the ONNX model's [64]",
    ),
    "wrong data type": (
        lambda t: t.replace("TYPE_FP32", "TYPE_FP64", 1),
        ": input 'input': data_type TYPE_FP64, the ONNX model's is TYPE_FP32",
    ),
    "unknown output": (
        lambda t: t.replace('"logits"', '"scores"'),
        ": output 'scores' is not an output of the ONNX model (it has 'logits', 'probabilities')",
    ),
    "negative max_batch_size": (
        lambda t: t.replace("max_batch_size: 1024", "max_batch_size: -1"),
        ": max_batch_size -1 must be >= 0",
    ),
    "batching without batch": (
        lambda t: (
            t.replace("max_batch_size: 1024", "max_batch_size: 0")
            .replace("dims: [ 64 ]", "dims: [ -1, 64 ]")
            .replace("dims: [ 10 ]", "dims: [ -1, 10 ]")
        ),
        ": dynamic_batching needs max_batch_size > 0",
    ),
    "preferred batch too large": (
        lambda t: t.replace("batching { }", "batching { preferred_batch_size: [ 8, 2048 ] }"),
        ": dynamic_batching: preferred_batch_size 2048 is not in [1, max_batch_size 1024]",
    ),
    "bad priority": (
        lambda t: t.replace(
            "batching { }", "batching { priority_levels: 2 default_priority_level: 3 }"
        ),
        ": dynamic_batching: default_priority_level 3 is not in [1, 2]",
    ),
}


@pytest.mark.parametrize("case", CONFIG_PROBLEMS)
def test_a_bad_config_is_refused_in_one_line(models: Path, case: str) -> None:
    edit, problem = CONFIG_PROBLEMS[case]
    path = models / "mixed" / "config.pbtxt"
    text = path.read_text()
    problem = problem.replace("{LINE}", str(text.count("\n") + 1))
    path.write_text(edit(text))
    with pytest.raises(LoadError) as refused:
        _load(models)
    message = str(refused.value)
    assert message.startswith(f"mixed/1: {path}") and "\n" not in message
    assert problem in message, message
    repo = _load(models, skip_bad_models=True)
    assert list(repo.models) == ["relu"] and list(repo.failed) == ["mixed"]


def test_config_checks_collect_every_problem_and_accept_a_partial_config(models: Path) -> None:
    model = onnx.load(str(models / "mixed" / "1" / "model.onnx"))
    with pytest.raises(ConfigError) as refused:
        check_model_config(
            'name: "x" backend: "python" max_batch_size: -2',
            model,
            name="mixed",
            source=Path("c.pbtxt"),
        )
    assert str(refused.value) == (
        "c.pbtxt: name 'x' is not the model folder's name 'mixed'; backend 'python': smartmixed "
        "serves 'onnxruntime' only; max_batch_size -2 must be >= 0"
    )
    partial = 'backend: "onnxruntime" max_batch_size: 8 dynamic_batching { }'  # Triton completes
    info = check_model_config(partial, model, name="mixed", source=Path("c.pbtxt"))
    assert (info.max_batch_size, info.dynamic_batching, info.max_queue_delay_s) == (8, True, None)
    info = check_model_config("", model, name="mixed", source=Path("c.pbtxt"))
    assert (info.max_batch_size, info.dynamic_batching, info.max_queue_delay_s) == (0, False, None)
