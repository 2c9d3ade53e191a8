"""The text tables of the package's reports (``str(report)``): one layout for all of them.

Example::

    >>> print("\\n".join(format_table([("tensor", "zeros"), ("fc1.weight", "12"), ("fc2.weight", "3")])))
    tensor      zeros
    -----------------
    fc1.weight     12
    fc2.weight      3
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["format_table"]


def format_table(rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a table whose first row is the header: the first column left-aligned, the others right-aligned,
    two spaces between columns, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines
