"""What can be checked of the containers and compose files without a container engine."""

from __future__ import annotations

import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from smartmixed.export.cli import build_parser as export_parser
from smartmixed.serve.cli import build_parser as serve_parser
from smartmixed.train.cli import build_parser as train_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PARSERS = {
    "smartmixed-train": train_parser,
    "smartmixed-export": export_parser,
    "smartmixed-serve": serve_parser,
}
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}")


def _with_defaults(text: str) -> str:
    """Interpolate ${VAR:-default} as compose does with no environment."""
    return VARIABLE.sub(lambda m: (m.group(2) or ":-")[2:], text)


def _compose() -> dict:
    return yaml.safe_load(_with_defaults(COMPOSE.read_text()))


def _commands(service: dict) -> list[list[str]]:
    """A service's stage commands; `sh -c "a && b"` gives [a, b]."""
    command = service.get("command")
    if command is None:
        return []
    if command[:2] == ["sh", "-c"]:
        return [shlex.split(part) for part in command[2].split("&&")]
    return [command]


def _mounts(service: dict) -> dict[str, str]:
    """volume name -> mount point in the container."""
    return {v.split(":")[0]: v.split(":")[1] for v in service.get("volumes", [])}


needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None,
    reason="docker-compose not installed (.ci/run installs it)",
)
needs_nginx = pytest.mark.skipif(
    shutil.which("nginx") is None, reason="nginx not installed (.ci/run installs it)"
)


@needs_compose
@pytest.mark.parametrize("profiles", [[], ["gpu"], ["scale"], ["gpu", "scale"]])
def test_compose_file_is_valid(profiles: list[str]) -> None:
    flags = [arg for p in profiles for arg in ("--profile", p)]
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *flags, "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


@needs_compose
def test_the_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = COMPOSE.read_text().replace(
        "condition: service_completed_successfully", "condition: when_it_feels_like_it", 1
    )
    (tmp_path / "docker-compose.yml").write_text(broken)
    result = subprocess.run(
        ["docker-compose", "-f", str(tmp_path / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode != 0


def test_every_variable_has_a_default_or_a_message() -> None:
    for name, rest in VARIABLE.findall(COMPOSE.read_text()):
        assert rest.startswith((":-", ":?")), f"${{{name}}} needs :-default or :?message"
    assert "$" not in _with_defaults(COMPOSE.read_text()).replace("$host", "").replace(
        "$proxy_add_x_forwarded_for", ""
    )


@pytest.mark.slow  # three interpreters importing torch for --help: .ci/run
def test_service_commands_are_real_stage_commands() -> None:
    services = _compose()["services"]
    seen = set()
    for name, service in services.items():
        for command in _commands(service):
            program, *args = command
            assert program in PARSERS, f"{name}: {program} is not a stage command"
            PARSERS[program]().parse_args(args)  # every flag exists and parses
            seen.add(program)
    assert seen == set(PARSERS)
    for stage in ("train", "export", "serve"):
        result = subprocess.run(
            [sys.executable, "-m", f"smartmixed.{stage}", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0 and "usage:" in result.stdout


def _option(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_volumes_paths_and_order_line_up() -> None:
    compose = _compose()
    services = compose["services"]
    assert set(compose["volumes"]) == {"runs", "models"}
    train_runs = _mounts(services["train"])["runs"]
    trained = [_option(c, "--out") for c in _commands(services["train"]) if "--out" in c]
    assert len(trained) == 2 and all(p.startswith(train_runs + "/") for p in trained)

    export_mounts = _mounts(services["export"])
    exports = [c for c in _commands(services["export"])]
    assert sorted(c[1] for c in exports) == sorted(  # the runs train wrote, same volume
        p.replace(train_runs, export_mounts["runs"]) for p in trained
    )
    repositories = {_option(c, "--repository") for c in exports}
    assert repositories == {export_mounts["models"]}

    for name in ("serve", "serve-gpu", "serve-replica"):
        (command,) = _commands(services[name])
        assert _option(command, "--repository") == _mounts(services[name])["models"]
        assert services[name]["depends_on"] == {
            "export": {"condition": "service_completed_successfully"}
        }
        assert "/v2/health/ready" in " ".join(services[name]["healthcheck"]["test"])
    assert services["export"]["depends_on"] == {
        "train": {"condition": "service_completed_successfully"}
    }
    assert "--device" in _commands(services["serve-gpu"])[0]
    assert services["serve-gpu"]["deploy"]["resources"]["reservations"]["devices"][0][
        "capabilities"
    ] == ["gpu"]
    assert services["serve-replica"]["deploy"]["replicas"] == 3
    assert services["lb"]["depends_on"] == {"serve-replica": {"condition": "service_healthy"}}
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in services["lb"]["volumes"]


def test_dockerfiles() -> None:
    cpu = (ROOT / "Dockerfile").read_text()
    serve_stage = cpu[cpu.index("AS serve") : cpu.index("AS pipeline")]
    assert "USER smartmixed" in serve_stage and "/v2/health/ready" in serve_stage
    assert "torch" not in serve_stage  # the serving image carries no torch
    assert 'pip install ".[train]"' in cpu
    cuda = (ROOT / "Dockerfile.cuda").read_text()
    assert 'pip install ".[gpu]"' in cuda and "USER smartmixed" in cuda
    assert ".venv" in (ROOT / ".dockerignore").read_text().split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # over 2 s: .ci/run runs it after make test
@needs_nginx
def test_nginx_config_passes_nginx_t_and_balances_real_servers(
    tmp_path: Path, repository: Path
) -> None:
    """nginx -t needs the upstream name to resolve; outside compose it becomes 127.0.0.1."""
    ports = [_free_port(), _free_port()]
    lb_port = _free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "server serve-replica:8000" in conf
    conf = conf.replace(
        "server serve-replica:8000 max_fails=3 fail_timeout=5s;",
        "".join(f"server 127.0.0.1:{p};" for p in ports),
    )
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{lb_port};")
    (tmp_path / "nginx.conf").write_text(conf)
    check = subprocess.run(
        ["nginx", "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr

    servers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "smartmixed.serve",
                "--repository",
                str(repository),
                "--port",
                str(p),
                "--log-level",
                "warning",
            ]
        )
        for p in ports
    ]
    nginx = subprocess.Popen(
        ["nginx", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path), "-g", "daemon off;"]
    )
    try:
        deadline = time.monotonic() + 60
        for p in ports:
            while time.monotonic() < deadline:
                try:
                    if (
                        httpx.get(f"http://127.0.0.1:{p}/v2/health/ready", timeout=1).status_code
                        == 200
                    ):
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
        body = {"instances": [[0.0] * 64]}
        statuses = [
            httpx.post(
                f"http://127.0.0.1:{lb_port}/v1/models/mixed:predict", json=body, timeout=10
            ).status_code
            for _ in range(20)
        ]
        assert statuses == [200] * 20
        counts = []
        for p in ports:
            text = httpx.get(f"http://127.0.0.1:{p}/metrics").text
            prefix = 'smartmixed_requests_total{endpoint="predict",model="mixed",status="200"}'
            line = next(row for row in text.splitlines() if row.startswith(prefix))
            counts.append(float(line.split()[-1]))
        assert sum(counts) == 20 and min(counts) > 0  # both replicas took traffic
    finally:
        nginx.terminate()
        for s in servers:
            s.terminate()
        for proc in (nginx, *servers):
            proc.wait(timeout=30)
