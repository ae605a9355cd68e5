"""What a soak run is shown as: soak.md (the server, each scenario's settings and measures
against its targets) and soak.png (soak RSS and responses/s, health-probe latency, the SIGTERM
timeline; for the wire attacks, health-probe latency, the server's RSS and its open
descriptors against the cap)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smartmixed.bench.soak_clients import PROBE_TIMEOUT_S
from smartmixed.bench.soak_scenarios import HEALTH_P99_TARGET_MS, OUTCOME_BIN_S, SCENARIOS
from smartmixed.bench.soak_wire import WIRE_SCENARIOS, scenario_of
from smartmixed.contract import outputs


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, dict):  # {'a': 1} -> "a: 1"; nested: "route (200: 16)"
        return (
            ", ".join(
                f"{k} ({_fmt(v)})" if isinstance(v, dict) else f"{k}: {_fmt(v)}"
                for k, v in value.items()
            )
            or "-"
        )
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def render_markdown(result: Mapping[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    s = c["server_settings"]
    lines = [
        "# Reliability: soak, overload, slow clients, a huge header, SIGTERM, wire attacks",
        "",
        f"Server: `{result['server_command_shell'] or c['url']}` (a fresh one per scenario; "
        f"PORT is a free port). Model {c['model']!r}, deadline {s['request_timeout_s']:g} s, "
        f"header timeout {s['header_timeout_s']:g} s.",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, Python {m['python']}, "
        f"onnxruntime {m['onnxruntime']}, uvicorn {m['uvicorn']}; load average at start / end "
        f"{m['load_avg_start_end'][0][0]} / {m['load_avg_start_end'][1][0]}. "
        f"Suite took {result['elapsed_s']} s.",
        "",
        "| scenario | status | targets met | missed |",
        "|---|---|---|---|",
    ]
    for name, row in result["summary"].items():
        lines.append(
            f"| {name} | {row['status']} | {row['met']} of {row['of']} | {row['missed']} |"
        )
    for name, entry in result["scenarios"].items():
        config = ", ".join(
            f"{k} {_fmt(v)}" for k, v in entry["config"].items() if k != "load_command"
        )
        lines += ["", f"## {name}", ""]
        if config:
            lines += [f"Ran with: {config}.", ""]
        if entry["status"] != "ok":
            lines += [f"**{entry['status']}**: {entry['error']}", ""]
            tail = entry["server"].get("log_tail")
            if tail:
                lines += ["```", tail[-600:], "```", ""]
            continue
        lines += ["| measured | value | target | met |", "|---|---|---|---|"]
        for key, value in entry["measured"].items():
            t = entry["targets"].get(key)
            met = entry["meets_target"].get(key)
            limit = f"{t['op']} {_fmt(t['limit'])}" if t else ""
            verdict = "" if t is None else "-" if met is None else "yes" if met else "NO"
            lines.append(f"| {key} | {_fmt(value)} | {limit} | {verdict} |")
    lines += [
        "",
        "Health probes open a new connection each (as the kubelet does; overload: liveness and "
        "readiness in turn, on the main port and, as metrics_port_health_*, on the server's "
        "metrics port); a failed probe counts "
        f"as {PROBE_TIMEOUT_S:g} s in the percentiles. RSS is VmRSS in MiB. Targets are reported, "
        "never asserted.",
    ]
    return "\n".join(lines) + "\n"


def _health_points(ax: Any, series: list, color: str, label: str) -> None:
    """Health probes of one scenario: dots when answered 200, crosses (at the probe timeout)
    when failed."""
    ok = [(t, ms) for t, ms, status in series if status == 200]
    bad = [(t, PROBE_TIMEOUT_S * 1e3) for t, _, status in series if status != 200]
    if ok:
        ax.plot(*zip(*ok), ".", ms=3, color=color, label=label)
    if bad:
        ax.plot(*zip(*bad), "x", color=color, label=f"{label}: failed")


def _health_target(ax: Any) -> None:
    ax.axhline(
        HEALTH_P99_TARGET_MS,
        color="k",
        lw=0.8,
        ls="--",
        label=f"target {HEALTH_P99_TARGET_MS:g} ms",
    )
    ax.set_yscale("log")


def plot(result: Mapping[str, Any], path: Path) -> None:
    plt = outputs.pyplot()

    scenarios = result["scenarios"]
    wire = {
        row: entry
        for row, entry in scenarios.items()
        if scenario_of(row) in WIRE_SCENARIOS and entry.get("series", {}).get("server")
    }
    classic = any(name in scenarios for name in SCENARIOS) or not wire
    fig, axes = plt.subplots(
        classic + bool(wire), 3, figsize=(15, 4 * (classic + bool(wire))), squeeze=False
    )
    if wire:
        _plot_wire(axes[-1], wire)
    if classic:
        _plot_classic(axes[0], scenarios)
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_classic(axes: Any, scenarios: Mapping[str, Any]) -> None:
    """Soak RSS and responses/s, health during overload, slow and header, the SIGTERM
    timeline."""
    ax_rss, ax_health, ax_term = axes
    soak = scenarios.get("soak", {}).get("series", {})
    if soak.get("rss_mib"):
        t, mb = zip(*soak["rss_mib"])
        ax_rss.plot(t, mb, color="C0")
        ax_rps = ax_rss.twinx()
        if soak.get("rps"):
            ts, n = zip(*soak["rps"])
            ax_rps.plot(ts, n, color="C1", alpha=0.5, lw=0.8)
        ax_rps.set_ylabel("responses/s", color="C1")
    ax_rss.set_ylabel("RSS (MiB)", color="C0")
    ax_rss.set_title("soak: server RSS (MiB) and responses/s", fontsize=9)
    ax_rss.set_xlabel("s")
    for i, name in enumerate(("overload", "slow", "header")):
        series = scenarios.get(name, {}).get("series", {}).get("health_ms") or []
        _health_points(ax_health, series, f"C{i}", name)
    metrics = scenarios.get("overload", {}).get("series", {}).get("metrics_port_health_ms")
    if metrics:
        _health_points(ax_health, metrics, "C3", "overload, metrics port")
    _health_target(ax_health)
    ax_health.set_title("health probe latency (ms), new connection each", fontsize=9)
    ax_health.set_xlabel("s since the scenario's start")
    ax_health.legend(fontsize=7)
    timeline = scenarios.get("sigterm", {}).get("series", {}).get("timeline")
    if timeline:
        width = timeline["bin_s"]
        for kind, counts in timeline.items():
            if isinstance(counts, list):
                ax_term.plot([i * width for i in range(len(counts))], counts, label=kind)
        ax_term.axvline(timeline["signal_s"], color="k", lw=0.8, ls="--", label="SIGTERM")
        ax_term.legend(fontsize=7)
    ax_term.set_title(f"SIGTERM under load: outcomes per {OUTCOME_BIN_S:g} s", fontsize=9)
    ax_term.set_xlabel("s")


def _plot_wire(axes: Any, rows: Mapping[str, Any]) -> None:
    """The wire attacks: health probes, the server's RSS, its open descriptors (dotted: the
    row's connection cap over the descriptors open before the attack)."""
    ax_health, ax_rss, ax_fd = axes
    for i, (row, entry) in enumerate(rows.items()):
        color = f"C{i % 10}"
        _health_points(ax_health, entry["series"].get("health_ms") or [], color, row)
        samples = entry["series"]["server"]  # [s, rss MiB, fds, connections]
        rss = [(s[0], s[1]) for s in samples if s[1] is not None]
        fds = [(s[0], s[2]) for s in samples if s[2] is not None]
        if rss:
            ax_rss.plot(*zip(*rss), color=color, lw=1, label=row)
        if fds:
            ax_fd.plot(*zip(*fds), color=color, lw=1, label=row)
            cap, before = entry["config"].get("connection_cap"), entry["measured"].get("fd_before")
            if cap is not None and before is not None:
                ax_fd.axhline(cap + before, color=color, lw=0.8, ls=":")
    _health_target(ax_health)
    ax_health.set_title("wire attacks: health probe latency (ms)", fontsize=9)
    ax_rss.set_title("wire attacks: server RSS (MiB)", fontsize=9)
    ax_fd.set_title("wire attacks: open descriptors (dotted: cap + those before)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("s since the attack's start")
        ax.legend(fontsize=6)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """DIR/soak.{json,md,png}, each written atomically."""
    return outputs.write_outputs(result, out, "soak", render=render_markdown, draw=plot)
