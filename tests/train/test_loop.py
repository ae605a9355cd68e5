from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smartmixed.nn import selection_logits
from smartmixed.train import artifacts, loop
from smartmixed.train.data import Dataset
from smartmixed.train.distributed import DistributedError
from smartmixed.train.loop import PHASE2_INITS, PROTOCOLS, TrainConfig, TrainError, train_run
from smartmixed.train.model import MixedMLP, SelectiveNetwork

ARCH = [64, 48, 32, 10]


def _config(**overrides) -> TrainConfig:
    base = {"arch": ARCH, "p1_epochs": 4, "p2_epochs": 6, "epochs": 8, "lr": 3e-3, "seed": 7}
    return TrainConfig(**{**base, **overrides})


def test_short_digits_run_reaches_90_percent(digits: Dataset, tmp_path: Path) -> None:
    spec = train_run(
        config=_config(p1_epochs=10, p2_epochs=25),
        dataset=digits,
        out=tmp_path / "run",
        progress=False,
    )
    assert spec.metrics["test_accuracy"] >= 0.90
    assert spec.metrics["phase1"]["test_accuracy"] > 0.5
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {
        "model.safetensors",
        "model.json",
        "history.jsonl",
        "report.md",
        "curves.png",
        "activations.png",
        "selection.png",
    } <= names
    assert "checkpoint.safetensors" not in names
    assert not [n for n in names if n.endswith(".tmp")]
    history = artifacts.read_history(tmp_path / "run")
    assert [r["phase"] for r in history] == ["selective"] * 10 + ["mixed"] * 25
    counts = history[0]["activation_counts"]
    assert [sum(c.values()) for c in counts] == [48, 32]
    # the frozen assignment is phase 1's argmax at its best-validation epoch
    assert spec.activation_counts() == spec.metrics["phase1"]["activation_counts"]


def test_fixed_baseline(digits: Dataset, tmp_path: Path) -> None:
    fixed = train_run(
        config=_config(mode="fixed:tanh", epochs=2), dataset=digits, out=tmp_path, progress=False
    )
    assert fixed.pool == ["tanh"] and fixed.activation_counts() == [{"tanh": 48}, {"tanh": 32}]
    assert "phase1" not in fixed.metrics
    assert [r["phase"] for r in artifacts.read_history(tmp_path)] == ["fixed", "fixed"]


@pytest.mark.parametrize("phase2_init", PHASE2_INITS)
def test_phase2_starts_from_fresh_or_carried_weights(
    digits: Dataset, tmp_path: Path, monkeypatch, phase2_init: str
) -> None:
    """The weights each phase's first epoch starts from, seen by the loop's own train_epoch:
    phase 2's are phase 1's kept ones (continue), or a new network's drawn with seed + 1."""
    starts, ends = {}, {}
    real = loop.train_epoch

    def spy(model, *args, **options):
        net = getattr(model, "module", model)
        phase = "selective" if isinstance(net, SelectiveNetwork) else "mixed"
        starts.setdefault(phase, net.canonical_state_dict())
        result = real(model, *args, **options)
        ends[phase] = net.canonical_state_dict()
        return result

    monkeypatch.setattr(loop, "train_epoch", spy)
    config = _config(p1_epochs=1, p2_epochs=1, phase2_init=phase2_init, select="last")
    spec = train_run(config=config, dataset=digits, out=tmp_path, progress=False)
    kept = ends["selective"]  # --select last keeps phase 1's last epoch
    torch.manual_seed(config.seed + 1)
    new = MixedMLP(ARCH, config.pool, spec.assignment).canonical_state_dict()
    assert starts["mixed"].keys() == kept.keys() == new.keys()
    same_as_kept = [torch.equal(starts["mixed"][k], kept[k]) for k in kept]
    same_as_new = [torch.equal(starts["mixed"][k], new[k]) for k in new]
    if phase2_init == "continue":
        assert all(same_as_kept) and not any(same_as_new)
    else:
        assert all(same_as_new) and not any(same_as_kept)


def test_save_load_round_trip_is_bit_exact(digits: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_run(config=_config(p2_epochs=2), dataset=digits, out=out, progress=False)
    spec, model = artifacts.load_model(out)
    weights = artifacts.load_tensors(out / "model.safetensors")
    for name, tensor in model.canonical_state_dict().items():
        assert torch.equal(tensor, weights[name])
    again = MixedMLP.from_spec(artifacts.load_spec(out))
    again.load_canonical_state_dict(weights)
    x = torch.from_numpy(digits.x_test)
    with torch.no_grad():
        assert torch.equal(model(x), again.eval()(x))
        accuracy = (model(x).argmax(1).numpy() == digits.y_test).mean()
    assert accuracy == pytest.approx(spec.metrics["test_accuracy"])


class _Interrupt(Exception):
    pass


# inside phase 1 in the quick suite; at its end and inside phase 2 in .ci/run's slow part
@pytest.mark.parametrize(
    "stop_after",
    [2, pytest.param(4, marks=pytest.mark.slow), pytest.param(7, marks=pytest.mark.slow)],
)
def test_resume_reproduces_an_uninterrupted_run_exactly(
    digits: Dataset, tmp_path: Path, stop_after: int
) -> None:
    config = _config()
    reference = train_run(config=config, dataset=digits, out=tmp_path / "ref", progress=False)

    def interrupt(record: dict) -> None:
        if record["epoch"] + 1 == stop_after:
            raise _Interrupt

    out = tmp_path / "killed"
    with pytest.raises(_Interrupt):
        train_run(config=config, dataset=digits, out=out, progress=False, after_epoch=interrupt)
    assert not (out / "model.json").exists()
    assert len(artifacts.read_history(out)) == stop_after
    with pytest.raises(TrainError, match="unfinished run"):
        train_run(config=config, dataset=digits, out=out, progress=False)
    # as a run written while the default protocol was called smartmixed records it
    file, state = artifacts.read_checkpoint(out)
    assert state["config"]["protocol"] == "default"
    state["config"]["protocol"] = "smartmixed"
    artifacts.save_checkpoint(out, artifacts.read_tensor_data(file)[0], state)
    resumed = train_run(config=config, dataset=digits, out=out, resume=True, progress=False)
    assert resumed.assignment == reference.assignment
    assert resumed.metrics["test_accuracy"] == reference.metrics["test_accuracy"]
    a = artifacts.load_tensors(tmp_path / "ref" / "model.safetensors")
    b = artifacts.load_tensors(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(artifacts.read_history(out)) == strip(artifacts.read_history(tmp_path / "ref"))


@pytest.mark.slow  # over 1.5 s: .ci/run runs it after make test
def test_resume_refuses_changed_options_and_finished_runs(digits: Dataset, tmp_path: Path) -> None:
    out = tmp_path / "run"

    def stop(record: dict) -> None:
        raise _Interrupt

    with pytest.raises(_Interrupt):
        train_run(config=_config(), dataset=digits, out=out, progress=False, after_epoch=stop)
    with pytest.raises(TrainError, match="options differ from the checkpoint in lr"):
        train_run(config=_config(lr=1e-2), dataset=digits, out=out, resume=True, progress=False)
    train_run(config=_config(), dataset=digits, out=out, resume=True, progress=False)
    with pytest.raises(TrainError, match="holds a finished run; nothing to resume"):
        train_run(config=_config(), dataset=digits, out=out, resume=True, progress=False)
    with pytest.raises(TrainError, match="already holds a finished run; pass --overwrite"):
        train_run(config=_config(), dataset=digits, out=out, progress=False)


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path) -> None:
    """A real process, killed with SIGKILL mid-run, then resumed from the command line."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "smartmixed.train",
        "--data",
        "digits",
        "--arch",
        "64,32,10",
        "--p1-epochs",
        "3",
        "--p2-epochs",
        "100",
        "--lr",
        "3e-3",
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        history = out / "history.jsonl"
        if history.exists() and len(history.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.json").exists(), "the run finished before it could be killed"
    done = len(artifacts.read_history(out))
    assert done >= 6
    result = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stdout
    spec = json.loads((out / "model.json").read_text())
    assert spec["metrics"]["epochs"] == 103
    assert [r["epoch"] for r in artifacts.read_history(out)] == list(range(103))


def test_bad_requests(digits: Dataset, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="expected 64 inputs and 10 classes"):
        train_run(config=_config(arch=[784, 8, 10]), dataset=digits, out=tmp_path, progress=False)
    with pytest.raises(TrainError, match="expected smartmixed or fixed:ACTIVATION"):
        _config(mode="mixed")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        _config(mode="fixed:swish")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="--device cuda was asked for"):
            train_run(
                config=_config(), dataset=digits, out=tmp_path / "c", device="cuda", progress=False
            )


# --------------------------------------------------------------------------------------------
# Selection controls and protocols


def test_protocols_set_their_values_and_options_override() -> None:
    paper = TrainConfig.from_protocol("paper", arch=ARCH)
    assert (paper.p1_epochs, paper.p2_epochs, paper.epochs) == (50, 350, 400)
    assert (paper.lr, paper.logit_lr, paper.tau, paper.tau_end) == (1e-4, None, 0.3, None)
    assert (paper.select, paper.candidate_norm, paper.phase2_init) == (
        "val-loss",
        "none",
        "continue",
    )
    assert not (paper.double_softmax or paper.eval_noise) and paper.clamp is None
    ref = TrainConfig.from_protocol("reference-code", arch=ARCH, p1_epochs=3)
    assert ref.p1_epochs == 3 and ref.phase2_init == "fresh" and ref.clamp == 10.0
    assert ref.double_softmax and ref.eval_noise
    default = TrainConfig.from_protocol("default", arch=ARCH, logit_lr=None)
    assert default == TrainConfig(arch=ARCH)  # the dataclass defaults are the default protocol
    assert {k: getattr(default, k) for k in PROTOCOLS["default"]} == {
        **PROTOCOLS["default"],
        "candidate_norm": "standard",  # None: standard for smartmixed
    }
    assert default.candidate_norm == "standard" and default.logit_lr == 1e-2
    assert TrainConfig(arch=ARCH, mode="fixed:relu").candidate_norm == "none"
    assert (
        TrainConfig(arch=ARCH, mode="fixed:relu", candidate_norm="standard").candidate_norm
        == "standard"
    )
    with pytest.raises(TrainError, match="--protocol 'nope'"):
        TrainConfig.from_protocol("nope", arch=ARCH)
    with pytest.raises(TrainError, match="'smartmixed' is now called 'default'"):
        TrainConfig.from_protocol("smartmixed", arch=ARCH)
    assert loop.recorded_options({"protocol": "smartmixed", "lr": 1.0}) == {
        **loop.LATER_OPTIONS,  # a run recorded before them: joint selection, no shrinking
        "protocol": "default",
        "lr": 1.0,
    }
    assert loop.recorded_options({"shrink_to": 2, "selection": "bilevel"})["shrink_to"] == 2
    with pytest.raises(TrainError, match="--select 'best': expected one of val-loss"):
        TrainConfig(arch=ARCH, select="best")
    with pytest.raises(TrainError, match="--tau-end must be > 0"):
        TrainConfig(arch=ARCH, tau_end=0.0)


@pytest.mark.slow  # over 1.5 s: .ci/run runs it after make test
def test_tau_anneals_exponentially_over_phase1(digits: Dataset, tmp_path: Path) -> None:
    config = _config(tau=1.0, tau_end=0.1, p1_epochs=3, p2_epochs=1)
    assert [round(config.tau_at(e), 6) for e in range(3)] == [1.0, round(0.1**0.5, 6), 0.1]
    assert _config(p1_epochs=3).tau_at(2) == 0.3  # no tau_end: constant
    train_run(config=config, dataset=digits, out=tmp_path / "run", progress=False)
    taus = [r["tau"] for r in artifacts.read_history(tmp_path / "run") if "tau" in r]
    assert taus == pytest.approx([1.0, 0.1**0.5, 0.1])


# the default (last) and the paper's (val-loss) in the quick suite; val-accuracy in .ci/run
@pytest.mark.parametrize(
    "rule", ["val-loss", pytest.param("val-accuracy", marks=pytest.mark.slow), "last"]
)
def test_select_rule_picks_the_phase1_epoch_to_freeze(
    digits: Dataset, tmp_path: Path, rule: str
) -> None:
    spec = train_run(
        config=_config(select=rule, p1_epochs=5, p2_epochs=1),
        dataset=digits,
        out=tmp_path / "run",
        progress=False,
    )
    phase1 = [r for r in artifacts.read_history(tmp_path / "run") if r["phase"] == "selective"]
    expected = {
        "val-loss": min(phase1, key=lambda r: r["val_loss"])["epoch"],
        "val-accuracy": max(phase1, key=lambda r: (r["val_accuracy"], -r["epoch"]))["epoch"],
        "last": phase1[-1]["epoch"],
    }[rule]
    assert spec.metrics["phase1"]["best_epoch"] == expected
    assert spec.metrics["phase1"]["select"] == rule
    # the frozen mix is that epoch's argmax, as the history recorded it
    assert spec.activation_counts() == phase1[expected]["activation_counts"]
    assert spec.training["select"] == rule


def test_logit_lr_moves_the_logits_and_history_has_the_logit_gradients(digits: Dataset) -> None:
    from smartmixed.train.loop import _optimizer, train_epoch
    from smartmixed.train.model import SelectiveMLP

    x, y = torch.from_numpy(digits.x_train), torch.from_numpy(digits.y_train)
    moved = {}
    for logit_lr in (1e-4, 1e-1):
        torch.manual_seed(0)
        model = SelectiveMLP(ARCH, _config().pool, candidate_norm="standard")
        optimizer = _optimizer(_config(lr=1e-3, logit_lr=logit_lr), model)
        assert [g["lr"] for g in optimizer.param_groups] == [1e-3, logit_lr]
        result = train_epoch(
            model,
            optimizer,
            x,
            y,
            batch_size=128,
            grad_clip=1.0,
            generator=torch.Generator().manual_seed(0),
        )
        moved[logit_lr] = max(float(p.detach().abs().max()) for p in selection_logits(model))
        assert set(result["logit_grad"]) == set(model.pool)
    assert moved[1e-4] < 0.02 < 0.5 < moved[1e-1]


@pytest.mark.slow  # over 1.5 s: .ci/run runs it after make test
def test_reference_code_protocol_runs_with_its_quirks(digits: Dataset, tmp_path: Path) -> None:
    config = TrainConfig.from_protocol(
        "reference-code", arch=ARCH, p1_epochs=2, p2_epochs=2, lr=3e-3
    )
    spec = train_run(config=config, dataset=digits, out=tmp_path / "run", progress=False)
    assert spec.training["double_softmax"] and spec.training["clamp"] == 10.0
    from smartmixed.train.model import SelectiveMLP

    noisy = SelectiveMLP(ARCH, config.pool, eval_noise=True).eval()
    x = torch.from_numpy(digits.x_val)
    with torch.no_grad():
        assert not torch.equal(noisy(x), noisy(x))  # Gumbel noise at evaluation
    loaded, _ = artifacts.load_model(tmp_path / "run")  # an ordinary mixed network
    assert loaded.assignment == spec.assignment and spec.metrics["test_accuracy"] > 0.3


@pytest.mark.parametrize("phase2_init", PHASE2_INITS)
def test_no_phase2_epochs_ships_the_phase1_choice(
    digits: Dataset, tmp_path: Path, phase2_init: str
) -> None:
    spec = train_run(  # fresh too: an untrained fresh network must never be what ships
        config=_config(p1_epochs=2, p2_epochs=0, phase2_init=phase2_init),
        dataset=digits,
        out=tmp_path / "run",
        progress=False,
    )
    assert spec.activation_counts() == spec.metrics["phase1"]["activation_counts"]
    assert spec.metrics["test_accuracy"] == pytest.approx(spec.metrics["phase1"]["test_accuracy"])


def test_logit_warmup_freezes_the_logits_for_the_first_phase1_epochs(
    digits: Dataset, tmp_path: Path
) -> None:
    # floor(0.7 * 3) = 2 epochs; joint: the instrument reads the (frozen) logits' gradient
    config = _config(p1_epochs=3, p2_epochs=1, logit_warmup=0.7, selection="joint")
    spec = train_run(config=config, dataset=digits, out=tmp_path / "run", progress=False)
    history = artifacts.read_history(tmp_path / "run")
    assert [r.get("logits_frozen") for r in history] == [True, True, False, None]
    first = spec.pool[0]
    for record in history[:2]:  # logits still zero: every argmax is the pool's first candidate
        assert all(layer[first] == sum(layer.values()) for layer in record["activation_counts"])
        assert any(v != 0.0 for v in record["logit_grad"].values())  # measured all the same
    assert history[2]["activation_counts"] != history[1]["activation_counts"]
    assert spec.training["logit_warmup"] == 0.7
    for bad in (-0.1, 1.0):
        with pytest.raises(TrainError, match="--logit-warmup is a fraction of phase 1"):
            _config(logit_warmup=bad)


def test_soft_epochs_relax_the_first_phase1_epochs_and_are_recorded(
    digits: Dataset, tmp_path: Path
) -> None:
    config = _config(p1_epochs=3, p2_epochs=1, soft_epochs=2, logit_grad_norm="candidate")
    spec = train_run(config=config, dataset=digits, out=tmp_path / "run", progress=False)
    history = artifacts.read_history(tmp_path / "run")
    assert [r.get("relaxed") for r in history] == [True, True, False, None]
    assert (spec.training["soft_epochs"], spec.training["logit_grad_norm"]) == (2, "candidate")
    with pytest.raises(TrainError, match="--soft-epochs must be >= 0"):
        _config(soft_epochs=-1)
    with pytest.raises(TrainError, match="--logit-grad-norm 'rms': expected one of none"):
        _config(logit_grad_norm="rms")


@pytest.mark.parametrize("norm", ["keep", "fold"])
def test_phase2_norm_fold_trains_the_same_function_as_a_plain_network(
    digits: Dataset, tmp_path: Path, norm: str
) -> None:
    from smartmixed.train.model import SelectiveMLP

    config = _config(phase2_norm=norm, phase2_init="continue")  # fold maps the kept weights
    assert config.candidate_norm == "standard"
    selective = SelectiveMLP(
        ARCH, config.pool, preprocessing=digits.preprocessing, candidate_norm="standard"
    )
    for logits in selection_logits(selective):
        torch.nn.init.normal_(logits)
    run = loop._Run(config, digits, tmp_path, resume=False, overwrite=False, device="cpu")
    phase = run._start_phase(1, previous=selective.eval())
    assert phase.name == "mixed"
    assert phase.model.candidate_norm == {"keep": "standard", "fold": "none"}[norm]
    x = torch.from_numpy(digits.x_val)
    with torch.no_grad():
        torch.testing.assert_close(phase.model.eval()(x), selective(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(TrainError, match="--phase2-norm 'x': expected one of keep, fold"):
        _config(phase2_norm="x")
