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
