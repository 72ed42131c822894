"""Loads the diffperf plugin for every test in the repository (perf/ benchmarks and tests/)."""

pytest_plugins = ["diffperf.plugin"]
