"""Speed benchmarks of mmh_jax (run ``python -m benchmarks --help`` from the repository root);
measured figures in ``benchmarks/RESULTS.md``, run files in ``benchmarks/results/``."""
