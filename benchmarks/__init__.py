"""lbkit's benchmarks: ``python -m benchmarks [--quick]`` runs them all; ``python -m benchmarks.NAME`` one."""
