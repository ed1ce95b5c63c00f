"""A whole gymbus stack on one machine: the launcher (demo, tests, benchmarks) and `make demo`."""
