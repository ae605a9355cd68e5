"""What a soak run is shown as: soak.md (the server, each scenario's settings and measures
against its targets) and soak.png (soak RSS and responses/s, health-probe latency, the SIGTERM
timeline)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smartmixed.bench import common
from smartmixed.bench.soak_clients import PROBE_TIMEOUT_S
from smartmixed.bench.soak_scenarios import HEALTH_P99_TARGET_MS, OUTCOME_BIN_S


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    return str(value)


def render_markdown(result: Mapping[str, Any]) -> str:
    m, c = result["machine"], result["config"]
    s = c["server_settings"]
    lines = [
        "# Reliability: soak, overload, slow clients, a huge header, SIGTERM",
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
        "Health probes open a new connection each (as the kubelet does); a failed probe counts "
        f"as {PROBE_TIMEOUT_S:g} s in the percentiles. RSS is VmRSS in MiB. Targets are reported, "
        "never asserted.",
    ]
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: Path) -> None:
    plt = common.pyplot()

    scenarios = result["scenarios"]
    fig, (ax_rss, ax_health, ax_term) = plt.subplots(1, 3, figsize=(15, 4))
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
        ok = [(t, ms) for t, ms, status in series if status == 200]
        bad = [(t, PROBE_TIMEOUT_S * 1e3) for t, _, status in series if status != 200]
        if ok:
            ax_health.plot(*zip(*ok), ".", ms=3, color=f"C{i}", label=name)
        if bad:
            ax_health.plot(*zip(*bad), "x", color=f"C{i}", label=f"{name}: failed")
    ax_health.axhline(
        HEALTH_P99_TARGET_MS,
        color="k",
        lw=0.8,
        ls="--",
        label=f"target {HEALTH_P99_TARGET_MS:g} ms",
    )
    ax_health.set_yscale("log")
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
    for ax in (ax_rss, ax_health, ax_term):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """DIR/soak.{json,md,png}, each written atomically."""
    return common.write_outputs(result, out, "soak", render=render_markdown, draw=plot)
