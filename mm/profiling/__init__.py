"""Profiling sharded runs: traces of every process summarised together, the step's HLO and its collectives,
device memory profiles, and the live profiler server (`mm-profile`, `launch/profile.py`)."""
