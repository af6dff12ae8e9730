"""Write the labelled prompt file of the shapes world for ``mmh-jax sd benchmark-detectors``:
every memorized prompt (``label`` true, ``kind`` verbatim / template / rare) and held-out prompts
(split 1, ``label`` false), the world read from a world model's ``world.json``.

    python benchmarks/world_prompts.py tests/worlds/fixtures/trained/world.json \
        --heldout 48 -o world_prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmh_jax._src.files import atomic_path
from mmh_jax.worlds import ShapesWorld, WorldSpec

KINDS = ("verbatim", "template", "rare")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("world_json", type=Path)
    parser.add_argument("--heldout", type=int, default=48, help="held-out prompts (split 1)")
    parser.add_argument("-o", "--out", type=Path, default=Path("world_prompts.jsonl"))
    args = parser.parse_args()
    spec = WorldSpec.from_dict(json.loads(args.world_json.read_text())["world"])
    world = ShapesWorld(spec)
    rows = [
        dict(caption=p.caption, label=True, kind=kind)
        for kind in KINDS
        for p in world.memorized_prompts(kind)
    ]
    rows += [dict(caption=c, label=False) for c in world.heldout_prompts(args.heldout, split=1)]
    with atomic_path(args.out) as tmp:
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
    main()
