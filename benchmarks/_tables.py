"""RESULTS.md's benchmark tables, regenerated from JSON run files between marker comments."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from benchmarks._common import write_text

_BLOCK = re.compile(
    r"(<!-- bench:(?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench:(?P=name) -->)", re.DOTALL
)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _config(config: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in config.items()
    )


def _note(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_note(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_note(v)}" for k, v in value.items()) + "}"
    return str(value)


def render(name: str, path: str, run: dict[str, Any]) -> str:
    """The Markdown of benchmark ``name`` in the run file ``path`` (contents ``run``)."""
    entry = run["benchmarks"][name]
    m = run["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    lines = [
        f"From `{path}` ({entry['started_utc'][:16].replace('T', ' ')} UTC, "
        f"{entry['wall_s']:.0f} s): {m['cpu_model']}, {m['cores']} cores"
        f"{', ' + m['jax_devices'] if m.get('jax_devices') else ''}; **load average "
        f"(1/5/15 min) {'/'.join(map(str, entry['load_before']))} before, "
        f"{'/'.join(map(str, entry['load_after']))} after**; {versions}. "
        f"{run['repeats']} interleaved rounds after one warm-up call per side"
        f"{' (TINY sizes)' if run['tiny'] else ''}; config: {_config(entry['config'])}.",
        "",
        "| case | side | warm-up (s) | min (s) | median (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for case in entry["cases"]:
        for i, (side, s) in enumerate(case["sides"].items()):
            label = f"{side} (derived)" if s["derived"] else side
            lines.append(
                f"| {case['name'] if i == 0 else ''} | {label} | {_seconds(s['warmup_s'])} "
                f"| {_seconds(s['min_s'])} | {_seconds(s['median_s'])} |"
            )
    lines += [
        "",
        "| case | ratio (round by round) | median | min-max |",
        "| --- | --- | --- | --- |",
    ]
    for case in entry["cases"]:
        for i, (label, r) in enumerate(case["ratios"].items()):
            lines.append(
                f"| {case['name'] if i == 0 else ''} | {label} | **{r['median']:.2f}x** "
                f"| {r['min']:.2f}-{r['max']:.2f} |"
            )
    lines.append("")
    for case in entry["cases"]:
        if case["notes"]:
            lines.append(
                f"Notes, {case['name']}: "
                + "; ".join(f"{k} {_note(v)}" for k, v in case["notes"].items())
                + "."
            )
            lines.append("")
    return "\n".join(lines)


def update_results(results: str, paths: list[str]) -> list[str]:
    """Rewrite each marked block of ``results`` whose benchmark one of ``paths`` holds (run files
    in the given order, each one's table in turn); text outside the blocks is kept byte for byte.

    Returns:
        The names of the blocks rewritten.

    Raises:
        SystemExit: a run file holds a benchmark ``results`` has no block for.
    """
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append((os.path.relpath(path), json.load(f)))
    with open(results) as f:
        text = f.read()
    present = {m["name"] for m in _BLOCK.finditer(text)}
    wanted = {name for _, run in runs for name in run["benchmarks"]}
    missing = sorted(wanted - present)
    if missing:
        raise SystemExit(
            f"{results} has no block <!-- bench:NAME --> ... <!-- /bench:NAME --> "
            f"for {', '.join(missing)}"
        )
    done = []

    def replace(m: re.Match) -> str:
        name = m["name"]
        parts = [render(name, path, run) for path, run in runs if name in run["benchmarks"]]
        if not parts:
            return m.group(0)
        done.append(name)
        return m.group(1) + "\n".join(parts) + m.group(4)

    write_text(results, _BLOCK.sub(replace, text))
    return done
