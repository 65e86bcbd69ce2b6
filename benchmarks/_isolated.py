"""Helpers of the memory benchmarks: each measurement runs in a fresh process, so one
form's allocations never inflate another's peak."""

from __future__ import annotations

import json
import subprocess
import sys


def kib_field(path: str, key: str) -> int:
    """A ``key: N kB`` field of a /proc file, in bytes (0 when absent)."""
    with open(path) as info:
        for line in info:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    """This process's resident set size."""
    return kib_field("/proc/self/status", "VmRSS:")


def run_isolated(script: str, arguments: list[str]) -> dict:
    """Runs ``python script arguments`` and returns the JSON object its last output line holds,
    or ``{"error": last line of stderr}``."""
    result = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def ratios(reference: dict, fast: dict) -> dict:
    """``time_ratio`` and ``memory_ratio`` of the reference form over the fast one, when
    both were measured (a form that was skipped or failed has no ``time_ms``)."""
    if "time_ms" not in reference or "time_ms" not in fast:
        return {}
    return {
        "time_ratio": reference["time_ms"] / fast["time_ms"],
        "memory_ratio": reference["peak_mb"] / max(fast["peak_mb"], 1e-3),
    }


def result_cell(result: dict) -> str:
    """One measured form as table text: time and peak memory, or why it was not measured."""
    if "time_ms" in result:
        return f"{result['time_ms']:9.1f} ms {result['peak_mb']:9.1f} MB"
    return f"{result.get('skipped', result.get('error', '?'))[:28]:>25s}"
