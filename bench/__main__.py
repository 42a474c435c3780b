"""Run every `bench/bench_*.py` module's `main()` in turn (or only those named on the command line).

Usage: `python -m bench [NAME ...]` where NAME is a module name with or without the `bench_` prefix
(`python -m bench params`). A failing benchmark is reported and the others still run; the exit status
is non-zero if any failed.
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path


def discover(selected: list[str]) -> list[str]:
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    if not selected:
        return names
    wanted = {s if s.startswith("bench_") else f"bench_{s}" for s in selected}
    unknown = wanted - set(names)
    if unknown:
        raise SystemExit(
            f"python -m bench: error: unknown benchmark(s) {', '.join(sorted(unknown))}; "
            f"available: {', '.join(n.removeprefix('bench_') for n in names)}"
        )
    return [n for n in names if n in wanted]


def main(argv: list[str] | None = None) -> int:
    names = discover(sys.argv[1:] if argv is None else argv)
    failed = []
    for name in names:
        print(f"\n{'=' * 100}\n== {name}\n{'=' * 100}", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{name}")
            module.main()
        except Exception:  # noqa: BLE001 - report and go on with the other benchmarks
            traceback.print_exc()
            failed.append(name)
            print(f"-- {name} FAILED after {time.perf_counter() - start:.1f} s", flush=True)
        else:
            print(f"-- {name} done in {time.perf_counter() - start:.1f} s", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
