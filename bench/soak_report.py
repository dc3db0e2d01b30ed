"""The soak's results (bench/soak.py): the JSON record of a run (``--out``) and the tables it prints."""

from __future__ import annotations

import datetime
import os
import sys
from collections import Counter
from typing import Any

from soak_checks import RSS_MIN_WINDOW, RSS_SLOPE_LIMIT, Outcome
from soak_world import CLIP_CFG, SPARSITY


def step_times(o: Outcome) -> dict[str, dict[str, float]]:
    """Count, median and maximum seconds of each kind of step, a corrupt drop's being the time to its rejection."""
    steps = {k: list(v) for k, v in o.driver.actions.items()}
    for c in o.driver.inbox.corrupt:
        if c.resolved is not None:
            steps.setdefault(f"corrupt drop ({c.kind}): rejected", []).append(c.resolved - c.t)
    return {k: {"n": len(v), "p50_s": round(sorted(v)[len(v) // 2], 2), "max_s": round(max(v), 2)}
            for k, v in sorted(steps.items())}


def results(o: Outcome, checks: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON record of a finished run: its figures, series, timeline and every check."""
    driver, service, rss, final_model = o.driver, o.service, o.rss, o.final_model
    return {
        "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
        "date": datetime.date.today().isoformat(),
        "seed": o.seed, "daemon_env": o.daemon_env, "seconds_driven": round(o.seconds_driven, 1),
        "wall_seconds": round(o.wall_seconds, 1),
        "machine": {"cpus": os.cpu_count(), "load1_at_end": round(os.getloadavg()[0], 2),
                    "mean_load1_during": rss.get("mean_load1"),
                    "daemon_cpu_share": round(o.daemon_cpu_seconds / o.seconds_driven, 2)},
        "model": {"clip": CLIP_CFG, "sparsity": SPARSITY,
                  "merged_parameters": sum(v.numel() for k, v in o.base.items() if k.startswith("visual."))},
        "steps": step_times(o),
        "drops": driver.inbox.drops,
        "corrupt_drops": dict(Counter(c.kind for c in driver.inbox.corrupt)),
        "corrupt_reasons": {c.kind: c.reason for c in driver.inbox.corrupt},
        "invalid_config_edits": dict(driver.invalid_edits),
        "cli_runs": driver.cli_runs[:5],
        "final_model": {"version": final_model.get("version"), "skills": sorted(final_model.get("skills", {}))},
        "versions_published": service.events["version_published"],
        "requests": o.requests, "rss": rss,
        "status_series": [[round(x["t"], 1), round(x["rss"], 1), round(x.get("anon", 0), 1),
                           round(x.get("file", 0), 1), x.get("threads"), x.get("fds")] for x in o.samples[::5]],
        "status_series_columns": ["t s", "VmRSS MiB", "RssAnon MiB", "RssFile MiB", "threads", "fds"],
        "weights_checks": driver.weights_checks, "registry": o.registry, "doctor": o.doctor,
        "daemon_errors_by_event": dict(service.errors), "daemon_error_samples": service.error_samples,
        "daemon_plain_text_lines": service.plain_lines[:20],
        "exit_code_on_sigterm": o.exit_code, "driver_failures": driver.failures, "timeline": driver.timeline,
        "checks": checks, "ok": all(c["ok"] for c in checks),
    }


def report(res: dict[str, Any]) -> str:
    """The tables a run prints: steps, drops, requests and RSS (when it ran to the end), then the checks."""
    lines = []
    if "steps" in res:
        m, r, tr = res["machine"], res["rss"], res["requests"]
        env = "".join(f", daemon env {k}={v}" for k, v in res.get("daemon_env", {}).items())
        lines += [f"soak: {res['seconds_driven']:.0f} s driven ({res['wall_seconds']:.0f} s wall), seed {res['seed']}"
                  f"{env}, {m['cpus']} CPUs, mean load {m['mean_load1_during']}, "
                  f"daemon CPU {m['daemon_cpu_share']:.2f} cores",
                  "", "| step | n | p50 s | max s |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['n']} | {v['p50_s']:.2f} | {v['max_s']:.2f} |" for k, v in res["steps"].items()]
        lat = tr["latency_ms"]
        lines += ["", f"drops {res['drops']} (corrupt: {res['corrupt_drops']}), versions published "
                      f"{res['versions_published']}, final version {res['final_model']['version']} with "
                      f"{len(res['final_model']['skills'])} skills",
                  f"requests: {tr['requests']} sent by {tr['clients']} clients, {tr['ok_200']} ok "
                  f"({tr['ok_per_second']}/s), expected 4xx {tr['expected_4xx']}, failed {tr['failed']}; "
                  f"latency ms p50 {lat['p50']} p95 {lat['p95']} p99 {lat['p99']} max {lat['max']}; answered from "
                  f"{tr['versions_answered_from']} versions",
                  f"RSS: start {r.get('start_mib')} MiB, after warm-up ({r.get('warmup_seconds')} s) "
                  f"{r.get('first_mib')} -> {r.get('last_mib')} MiB, min {r.get('min_mib')} max {r.get('max_mib')}, "
                  f"slope {r.get('slope_mib_per_min')} MiB/min over {r.get('window_minutes')} min "
                  + (f"(pass: <= {RSS_SLOPE_LIMIT} MiB/min)" if r.get("judged") else
                     f"(not judged: under {RSS_MIN_WINDOW:.0f} min after warm-up)"),
                  f"     RssAnon slope {r.get('anon_slope_mib_per_min')} MiB/min, RssFile slope "
                  f"{r.get('file_slope_mib_per_min')} MiB/min; threads {r.get('threads_after_warmup')}, open fds "
                  f"{r.get('fds_after_warmup')} (min, max after warm-up)", ""]
    lines += ["| check | result | detail |", "|---|---|---|"]
    lines += [f"| {c['check']} | {'PASS' if c['ok'] else 'FAIL'} | {c['detail']} |" for c in res["checks"]]
    lines += ["", "soak: PASS" if res.get("ok") else "soak: FAIL"]
    return "\n".join(lines)
