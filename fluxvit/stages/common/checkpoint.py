"""Atomic training checkpoints with exact resume, kept to the last k (timm ``CheckpointSaver`` style).

A checkpoint is a directory ``ckpt-{step:08d}`` written by ``accelerator.save_state`` (model, optimizer,
RNG states of every rank, registered objects such as the LR scheduler and EMA; DeepSpeed engines save their
own shards) plus ``trainer_state.json`` (step, data position, counters) and the resolved config. It is
written to ``ckpt-XXXXXXXX.tmp`` and renamed with ``os.replace`` only when complete, so a run killed while
saving never leaves a half-written checkpoint that ``resume=auto`` would pick.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

__all__ = ["CheckpointManager", "find_latest"]

log = logging.getLogger("fluxvit.train")
_NAME = re.compile(r"^ckpt-(\d{8})$")
STATE_FILE = "trainer_state.json"


def find_latest(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory in ``run_dir`` (None if there is none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()
                   and (p / STATE_FILE).is_file())
    return found[-1][1] if found else None


class CheckpointManager:
    """Save/restore full training state through an ``accelerate.Accelerator``.

    Args:
        accelerator: the run's accelerator (collective: every rank calls ``save``/``load``).
        run_dir: directory holding ``ckpt-*`` folders.
        keep_last: how many complete checkpoints to keep (older ones are deleted after a save).
    """

    def __init__(self, accelerator, run_dir: str | Path, keep_last: int = 2):
        self.acc = accelerator
        self.run_dir = Path(run_dir)
        self.keep_last = max(1, keep_last)

    def save(self, step: int, trainer_state: dict[str, Any], config: dict | None = None) -> Path:
        """Write the checkpoint of optimizer step ``step``; returns its final path."""
        final = self.run_dir / f"ckpt-{step:08d}"
        tmp = self.run_dir / f"ckpt-{step:08d}.tmp"
        if self.acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp), safe_serialization=True)
        if self.acc.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            log.info("saved checkpoint %s", final)
        self.acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        done = sorted(p for p in self.run_dir.iterdir() if _NAME.match(p.name) and p.is_dir())
        for old in done[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """Checkpoint path of a ``resume`` setting: "" (none), "auto" (newest in run_dir, None if absent),
        or an explicit directory (must exist)."""
        if not resume:
            return None
        if resume == "auto":
            return find_latest(self.run_dir)
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"resume={resume!r} is not a complete checkpoint directory "
                                    f"(no {STATE_FILE}); use resume=auto or a ckpt-XXXXXXXX folder")
        return path

    def load(self, path: Path) -> dict[str, Any]:
        """Restore model/optimizer/RNG/registered objects from ``path``; returns its trainer state."""
        self.acc.load_state(str(path))
        state = json.loads((Path(path) / STATE_FILE).read_text())
        log.info("resumed from %s at step %d", path, state["step"])
        return state
