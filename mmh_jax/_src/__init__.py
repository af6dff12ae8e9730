"""Internals shared by several mmh_jax packages (not public API; as optax's ``_src``)."""
