"""Benchmarks run by `make bench` (`python -m bench`): each `bench/bench_*.py` module's `main()` prints one
section of side-by-side measurements taken in the same run, on the same machine."""
