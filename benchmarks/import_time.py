"""What ``import lightning_prune`` costs beyond ``import pytorch_lightning``, and which packages it brings in.

Each round starts a fresh interpreter that imports torch and pytorch_lightning first (not timed), then times
``import lightning_prune`` alone and lists the top-level packages it added to ``sys.modules``. Rounds alternate
with a control that times the import of a module that is already loaded (the timer's own floor). Prints the
median, the goal (at most 0.5 s beyond ``import pytorch_lightning``) and the heavy packages that must not appear.

Usage (from the repository root)::

    python benchmarks/import_time.py --rounds 7
    python benchmarks/import_time.py --smoke          # two rounds

Exits with status 1 when the median misses the goal or a heavy package appears; with ``--smoke`` only for a
heavy package (two rounds on a loaded machine say nothing about the time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch_pruning", "matplotlib", "torchvision", "lightning", "transformers", "timm")
GOAL_S = 0.5

_CODE = """
import json, sys, time
import torch, pytorch_lightning
before = set(sys.modules)
start = time.perf_counter()
import lightning_prune
seconds = time.perf_counter() - start
added = sorted({m.split(".")[0] for m in set(sys.modules) - before})
print(json.dumps({"seconds": seconds, "added": added}))
"""


def one_round() -> dict:
    out = subprocess.run([sys.executable, "-c", _CODE], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--smoke", action="store_true", help="two rounds; the time goal does not set the exit status")
    args = parser.parse_args(argv)
    rounds = [one_round() for _ in range(2 if args.smoke else args.rounds)]
    seconds = [r["seconds"] for r in rounds]
    added = sorted(set().union(*(r["added"] for r in rounds)))
    heavy = [m for m in added if m in HEAVY]
    median = statistics.median(seconds)
    print(f"import lightning_prune after torch and pytorch_lightning: median {median:.3f} s over {len(seconds)} fresh")
    print(f"interpreters (min {min(seconds):.3f}, max {max(seconds):.3f}); goal <= {GOAL_S} s: "
          f"{'met' if median <= GOAL_S else 'missed'}")  # fmt: skip
    print(f"packages it added: {', '.join(added)}")
    print(f"heavy packages among them ({', '.join(HEAVY)}): {', '.join(heavy) or 'none'}")
    return 0 if (median <= GOAL_S or args.smoke) and not heavy else 1


if __name__ == "__main__":
    sys.exit(main())
