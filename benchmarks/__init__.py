"""Benchmarks: measured, not asserted; each prints its figures and writes JSON under benchmarks/results/."""
import json
import os
from pathlib import Path

__all__ = ["write_result"]


def write_result(path, data: dict, quiet: bool = False) -> Path:
    """Write a benchmark's result as JSON (atomically: temp file, then rename) and say where (unless quiet)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")
    return path
