"""`make bench`: every benchmark of bench/, one after the other, each in its own process.

    python bench/run_all.py

Runs bench/telemetry_overhead.py, bench/recording_overhead.py, then bench/learning.py, each
that exists, with its defaults (run one directly for its options). Exits 1 if any failed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("telemetry_overhead.py", "recording_overhead.py", "learning.py")


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        script = HERE / name
        if not script.exists():
            continue
        print(f"=== {name}", flush=True)
        if subprocess.run([sys.executable, str(script)], check=False).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
