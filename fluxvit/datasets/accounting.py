"""Skip accounting of the loader: per-batch reports from the workers, the counters the loop logs (:class:`DataStats`,
process-wide :func:`stats`) and one rate-limited skip log per process."""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataStats", "new_report", "flush_report", "skip_log", "stats"]

log = logging.getLogger("fluxvit.datasets.loader")


@dataclass
class DataStats:
    """Counters the training loop logs: delivered and skipped samples, shard errors, skip reasons.

    ``skipped`` counts every sample that could not be used plus, per pass over a broken shard (truncated, garbage
    or unreadable), the samples it lost when ``sizes.json`` gives its size and one skip otherwise, so a corrupt
    shard anywhere in the list shows in ``skipped_samples``;
    ``shard_errors`` counts the broken shards alone."""

    samples: int = 0
    skipped: int = 0
    shard_errors: int = 0
    reasons: Counter = field(default_factory=Counter)
    recent: deque = field(default_factory=lambda: deque(maxlen=32))  # (key, reason) of the last skips

    def update(self, report: dict) -> None:
        """Merge a per-batch report ``{"samples", "skipped": {reason: n}, "shard_errors", "keys"}``."""
        self.samples += int(report.get("samples", 0))
        for reason, n in report.get("skipped", {}).items():
            self.skipped += n
            self.reasons[reason] += n
        self.shard_errors += int(report.get("shard_errors", 0))
        self.recent.extend(report.get("keys", ()))

    def as_dict(self, prefix: str = "data/") -> dict[str, int]:
        """Flat scalars for a tracker: ``{prefix+"samples", prefix+"skipped", prefix+"shard_errors"}``."""
        return {f"{prefix}samples": self.samples, f"{prefix}skipped": self.skipped,
                f"{prefix}shard_errors": self.shard_errors}


_STATS = DataStats()


def stats() -> DataStats:
    """Process-wide counters summed over every :class:`VideoLoader` iterated in this process."""
    return _STATS


class _RateLimitedLog:
    """Log the first ``burst`` skips, then at most one line per ``interval`` seconds with the count in between.

    One instance per process (``skip_log``) used by the main process for every loader, epoch and pass, so the
    limit holds across them (DataLoader workers only report their skips)."""

    def __init__(self, burst: int = 5, interval: float = 30.0) -> None:
        self.burst, self.interval = burst, interval
        self.count, self.suppressed, self.last = 0, 0, 0.0

    def __call__(self, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless rate-limited; returns whether a line was written."""
        self.count += 1
        now = time.monotonic()
        if self.count <= self.burst or now - self.last >= self.interval:
            extra = f" ({self.suppressed} more skipped since the last message)" if self.suppressed else ""
            log.warning(msg + extra, *args)
            self.last, self.suppressed = now, 0
            return True
        self.suppressed += 1
        return False

    def suppress(self, n: int) -> None:
        """Count ``n`` skips that were reported without a key (beyond a report's 32 keys)."""
        self.count += n
        self.suppressed += n


skip_log = _RateLimitedLog()



def new_report() -> dict:
    """An empty per-stream report (what a worker sends with its batches)."""
    return {"samples": 0, "skipped": Counter(), "shard_errors": 0, "keys": [], "events": 0, "passes": 0}


def flush_report(report: dict) -> dict:
    """A picklable copy of ``report`` for the main process; ``report`` is reset in place."""
    out = {**report, "skipped": dict(report["skipped"]), "keys": report["keys"][:32]}
    passes = report["passes"]
    report.update(new_report())
    report["passes"] = passes
    return out


