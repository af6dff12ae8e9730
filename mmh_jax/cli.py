"""The ``mmh-jax`` command line.

Subcommands:

* ``mmh-jax demo`` (same as ``mmh-jax demo von-mises``): the paper's von Mises
  mixture experiment (Section 4, Figure 4) on CPU in under a minute.
* ``mmh-jax demo digits``: the image-scale memorization demo on scikit-learn's 8x8
  digits.

Errors in the input are reported as one line on stderr with exit status 2;
Ctrl-C exits with status 130 and leaves no half-written output file.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn, Sequence

__all__ = ["main", "build_parser"]

DEMOS = ("von-mises", "digits")


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are a single line on stderr (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full ``mmh-jax`` argument parser."""
    from mmh_jax.experiments import digits, von_mises

    parser = _Parser(
        prog="mmh-jax",
        description="Memorization in generative models read off local intrinsic dimension "
        "(Ross et al., ICLR 2025), in JAX.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    demo = commands.add_parser(
        "demo",
        help="run a self-contained CPU demo (default: the von Mises mixture)",
        description="Run a self-contained demo. `mmh-jax demo` runs the von Mises mixture demo; "
        "`mmh-jax demo digits --help` describes the digits demo.",
    )
    which = demo.add_subparsers(dest="demo", metavar="DEMO", parser_class=_Parser)
    vm = which.add_parser(
        "von-mises",
        help="the paper's Figure 4: OD-Mem and DD-Mem on a von Mises mixture (default, ~1 min on CPU)",
        description="Train a small diffusion model on 100 points from a von Mises mixture (circle, LID* = 1) "
        "plus a point mass at the origin (LID* = 0), sample it, estimate LID_theta with FLIPD and the normal "
        "bundle and LID_* with local PCA, and label samples OD-Mem / DD-Mem / not memorized "
        "(paper, Section 4, Figure 4). This is what `mmh-jax demo` runs; `mmh-jax demo digits` runs the "
        "image-scale demo.",
    )
    von_mises.add_arguments(vm)
    dg = which.add_parser(
        "digits",
        help="image-scale demo on scikit-learn's 8x8 digits with duplicated and rare training images",
        description="Train a small convolutional diffusion model on scikit-learn's 8x8 digits where some "
        "images are duplicated many times (DD-Mem) and a few classes have very few images (OD-Mem), sample "
        "it, find each sample's nearest training image (calibrated l2) and show that FLIPD separates "
        "memorized from novel samples (AUROC of -FLIPD).",
    )
    digits.add_arguments(dg)
    return parser


def _normalise(argv: list[str]) -> list[str]:
    """Make ``demo`` without a demo name mean ``demo von-mises``."""
    if argv and argv[0] == "demo" and (len(argv) == 1 or argv[1] not in DEMOS):
        return ["demo", "von-mises", *argv[1:]]
    return argv


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mmh-jax`` console script; returns the exit status."""
    from mmh_jax.experiments._common import DemoInputError

    argv = _normalise(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            if args.demo == "digits":
                from mmh_jax.experiments import digits as mod
            else:
                from mmh_jax.experiments import von_mises as mod
            mod.run(mod.config_from_args(args))
            return 0
    except DemoInputError as err:
        print(f"mmh-jax: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mmh-jax: interrupted; no partial output files were left behind", file=sys.stderr)
        return 130
    except OSError as err:
        print(f"mmh-jax: error: {err.strerror or err} ({getattr(err, 'filename', '') or ''})", file=sys.stderr)
        return 1
    parser.error(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
