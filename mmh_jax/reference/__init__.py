"""Reference implementations in other frameworks, for parity checks and benchmarks.

Import the submodules directly (``mmh_jax.reference.torch_lid`` needs PyTorch).
"""
