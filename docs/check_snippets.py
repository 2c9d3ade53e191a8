"""Run every Python code block of the documentation pages, each as it is written, and report which fail.

    python docs/check_snippets.py                      # every page under docs/ (not api/)
    python docs/check_snippets.py docs/schedules.md    # some pages

Each ```python block runs alone, in a fresh Python process, in a fresh temporary folder that holds a link
to the repository's ``examples/`` (so ``from examples.lenet_mnist import LitLeNet`` and
``examples/configs/...`` work as they do from the repository root), with the repository on ``PYTHONPATH``.
A block that launches processes of its own (``if __name__ == "__main__":``, for DDP and FSDP2) is written
to a file and run as a script. A block whose first line is ``# not run: <why>`` is skipped and listed.
Exit status 1 if any block fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
TIMEOUT_S = 900


def blocks(page: Path) -> list[tuple[int, str]]:
    text = page.read_text()
    return [(text[: m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def run(page: Path, line: int, code: str) -> tuple[bool, str, float]:
    with tempfile.TemporaryDirectory(prefix="snippet-") as tmp:
        os.symlink(ROOT / "examples", Path(tmp) / "examples")
        script = Path(tmp) / "snippet.py"
        script.write_text(code)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, str(ROOT), os.environ.get("PYTHONPATH", "")])}
        env.setdefault("PYTHONWARNINGS", "ignore")
        start = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, str(script)], cwd=tmp, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired:
            return False, f"timed out after {TIMEOUT_S} s", time.perf_counter() - start
        return done.returncode == 0, (done.stdout + done.stderr)[-4000:], time.perf_counter() - start


def main(argv: list[str]) -> int:
    pages = [Path(p).resolve() for p in argv] or sorted(p for p in DOCS.glob("*.md"))
    failed, skipped, count = [], [], 0
    for page in pages:
        for line, code in blocks(page):
            where = f"{page.relative_to(ROOT)}:{line}"
            first = code.lstrip().splitlines()[0] if code.strip() else ""
            if first.startswith("# not run:"):
                skipped.append(f"{where} ({first[len('# not run:') :].strip()})")
                continue
            count += 1
            ok, output, seconds = run(page, line, code)
            print(f"{'ok  ' if ok else 'FAIL'} {where} ({seconds:.0f} s)", flush=True)
            if not ok:
                failed.append(where)
                print("    " + output.replace("\n", "\n    "), flush=True)
    print(f"{count - len(failed)} of {count} blocks ran; failed: {failed or 'none'}; skipped: {skipped or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
