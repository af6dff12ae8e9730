"""Run benchmarks into a JSON run file, or regenerate RESULTS.md's tables from run files.

    python -m benchmarks run lpca retrieval --repeats 5 --out benchmarks/results/NAME.json
    python -m benchmarks run unet --set unet.batch=16 --set unet.normal_bundle=false
    python -m benchmarks run retrieval --tiny --repeats 2       # tiny sizes: a smoke test
    python -m benchmarks tables --json benchmarks/results/*.json

``run`` times the compared sides of each benchmark in interleaved rounds (A B A B ..., after
one warm-up call each, reported apart), and records min and median per side, ratios round by
round, the machine (CPU model, cores, library versions) and the load average before and after
each benchmark; the file is rewritten (atomically) after each benchmark. ``tables`` replaces
each block ``<!-- bench:NAME -->`` ... ``<!-- /bench:NAME -->`` of RESULTS.md with the tables of
benchmark NAME from the given run files, and nothing else.

Each benchmark is a module ``benchmarks/bench_NAME.py`` with a frozen ``Config`` (its sizes;
``--set NAME.FIELD=VALUE`` changes one), ``TINY`` (seconds; what tests/test_benchmarks.py runs)
and ``run(config, *, repeats)``. The SD-scale ones (``sd``, ``attribution``, ``guarded --set
guarded.full=true``) default to Stable Diffusion v1.5's full shapes: minutes to hours per round
on a CPU; ``--set NAME.width=...`` and the like reduce them.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import sys
import time
from typing import Any

from benchmarks._common import load_average, machine, write_json
from benchmarks._tables import update_results

#: The benchmarks ``run`` knows: ``benchmarks/bench_NAME.py`` for each.
NAMES = (
    "unet",
    "lpca",
    "retrieval",
    "scoring",
    "flipd",
    "sd",
    "gan_lid",
    "sscd",
    "guarded",
    "attribution",
    "linalg",
)
SCHEMA = "mmh_jax.benchmarks/1"


def _module(name: str):
    return importlib.import_module(f"benchmarks.bench_{name}")


def _parse_value(text: str, default: Any, where: str) -> Any:
    if isinstance(default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"--set {where}: expected true or false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(default, tuple):
        return tuple(type(default[0])(v) for v in text.split(","))
    try:
        return type(default)(text)
    except ValueError:
        raise SystemExit(
            f"--set {where}: expected a {type(default).__name__}, got {text!r}"
        ) from None


def configs(names: list[str], *, tiny: bool, settings: list[str]) -> dict[str, Any]:
    """Each benchmark's config: its defaults (or ``TINY``), then the ``NAME.FIELD=VALUE``
    settings."""
    out = {name: (_module(name).TINY if tiny else _module(name).Config()) for name in names}
    for setting in settings:
        target, sep, text = setting.partition("=")
        name, dot, field = target.partition(".")
        if not sep or not dot:
            raise SystemExit(f"--set {setting!r}: expected NAME.FIELD=VALUE")
        if name not in out:
            raise SystemExit(
                f"--set {setting!r}: benchmark {name!r} is not being run "
                f"(running: {', '.join(names)})"
            )
        fields = {f.name for f in dataclasses.fields(out[name])}
        if field not in fields:
            raise SystemExit(
                f"--set {setting!r}: {name} has no field {field!r} "
                f"(fields: {', '.join(sorted(fields))})"
            )
        value = _parse_value(text, getattr(out[name], field), setting)
        out[name] = dataclasses.replace(out[name], **{field: value})
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run(
    names: list[str], *, repeats: int, out: str, tiny: bool, settings: list[str], argv: list[str]
) -> dict[str, Any]:
    """Run ``names`` and write the run file ``out`` after each; returns its contents."""
    cfgs = configs(names, tiny=tiny, settings=settings)
    if "scoring" in cfgs:  # before JAX starts: the simulated devices of its mesh
        _module("scoring").request_devices(cfgs["scoring"])
    record: dict[str, Any] = {
        "schema": SCHEMA,
        "command": ["python", "-m", "benchmarks", *argv],
        "started_utc": _now(),
        "finished_utc": None,
        "repeats": repeats,
        "tiny": tiny,
        "machine": machine(),
        "load_before": load_average(),
        "load_after": None,
        "benchmarks": {},
    }
    for name, cfg in cfgs.items():
        print(f"[{name}] {cfg}", flush=True)
        entry = {
            "config": dataclasses.asdict(cfg),
            "started_utc": _now(),
            "load_before": load_average(),
        }
        start = time.perf_counter()
        entry["cases"] = _module(name).run(cfg, repeats=repeats)
        entry.update(wall_s=time.perf_counter() - start, load_after=load_average())
        record["benchmarks"][name] = entry
        for case in entry["cases"]:
            for label, r in case["ratios"].items():
                print(
                    f"[{name}] {case['name']}: {label} {r['median']:.2f}x "
                    f"({r['min']:.2f}-{r['max']:.2f})",
                    flush=True,
                )
        write_json(out, record)
    import jax  # started by now; its devices as the benchmarks saw them

    record["machine"]["jax_devices"] = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    record.update(finished_utc=_now(), load_after=load_average())
    write_json(out, record)
    return record


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run benchmarks, write a JSON run file")
    p_run.add_argument(
        "names",
        nargs="+",
        choices=NAMES,
        metavar="NAME",
        help=f"benchmarks to run: {', '.join(NAMES)}",
    )
    p_run.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="timed interleaved rounds after the warm-up (default 5)",
    )
    p_run.add_argument(
        "--out", help="the JSON run file (default benchmarks/results/<UTC time>-<names>.json)"
    )
    p_run.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke test)")
    p_run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME.FIELD=VALUE",
        dest="settings",
        help="change one config field (repeatable)",
    )
    p_tab = sub.add_parser("tables", help="regenerate RESULTS.md's marked tables from run files")
    p_tab.add_argument("--json", nargs="+", required=True, metavar="FILE", help="run files")
    p_tab.add_argument(
        "--results",
        default="benchmarks/RESULTS.md",
        help="the Markdown file to update (default benchmarks/RESULTS.md)",
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1, got {args.repeats}")
        out = args.out or (
            f"benchmarks/results/"
            f"{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%SZ}-"
            f"{'-'.join(args.names)}.json"
        )
        run(
            list(dict.fromkeys(args.names)),
            repeats=args.repeats,
            out=out,
            tiny=args.tiny,
            settings=args.settings,
            argv=argv,
        )
        print(f"wrote {out}")
    else:
        blocks = update_results(args.results, args.json)
        print(f"updated {args.results}: {', '.join(blocks)}")


if __name__ == "__main__":
    main()
