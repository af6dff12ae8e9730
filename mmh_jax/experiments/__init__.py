"""The recipes behind the ``mmh-jax`` commands: the demos (the paper's von Mises mixture,
Section 4, Figure 4; the 8x8 digits; the shapes world's prompts), ``sd``, ``gan``, ``cifar10``
and ``convert``.

Each recipe module has ``config_from_args(args)`` and ``run(config)`` (most also
``add_arguments(parser)``); the scripts in the repository's ``experiments/`` folder and the
console command (:mod:`mmh_jax.cli`) only parse flags and call these.
"""

__all__ = ["von_mises", "digits"]
