"""Private helpers shared across the package: argument checks, text tables, Lightning imports."""
