"""Verified training checkpoints with exact resume, kept to the last k (timm ``CheckpointSaver`` style).

A checkpoint is a directory ``ckpt-{step:08d}`` written by ``accelerator.save_state`` (model, optimizer,
RNG states of every rank, registered objects such as the LR scheduler and EMA; DeepSpeed engines save their
own shards) plus ``trainer_state.json`` (step, data position, counters) and the resolved config.

Completeness rule: everything is written into ``ckpt-XXXXXXXX.tmp``; then ``manifest.json`` (the size and
SHA-256 of every other file) is written last, and the folder is renamed with ``os.replace``. A checkpoint
counts as intact only when its manifest exists and every file it lists has that size and hash. So

* ``resume=auto`` takes the newest intact checkpoint and logs a warning for each newer one it passed over
  (truncated file, missing manifest, hash mismatch);
* an explicit ``resume=PATH`` that is not intact raises ``CheckpointError`` whose one-line message names the
  offending file;
* ``*.tmp`` leftovers of a save that was killed are deleted when the next run in that directory starts;
* after each save, checkpoints newer than it (a timeline abandoned by resuming from an older one) and all but
  the newest ``keep_last`` older ones are deleted.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from fluxvit.models.checkpoint import set_default_mode

__all__ = ["CheckpointError", "CheckpointManager", "MANIFEST", "clean_leftovers", "find_latest", "verify_checkpoint",
           "write_manifest"]

log = logging.getLogger("fluxvit.train")
_NAME = re.compile(r"^ckpt-(\d{8})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt, or could not be written; the message is one line."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(ckpt_dir: str | Path, step: int) -> Path:
    """Write ``manifest.json`` (size and SHA-256 of every file under ``ckpt_dir``) and fsync it; files get the
    mode the umask gives (safetensors writes 0600).

    Call it last: its presence is what marks the checkpoint complete.
    """
    ckpt_dir = Path(ckpt_dir)
    files = {}
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            set_default_mode(p)
            files[p.relative_to(ckpt_dir).as_posix()] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    path = ckpt_dir / MANIFEST
    with open(path, "w") as f:
        f.write(json.dumps({"step": step, "files": files}, indent=1))
        f.flush()
        os.fsync(f.fileno())
    return path


def verify_checkpoint(ckpt_dir: str | Path, hashes: bool = True) -> dict:
    """Check ``ckpt_dir`` against its manifest; returns the manifest.

    Raises:
        CheckpointError: one line naming the first missing, truncated or altered file (or the missing manifest).
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint {ckpt_dir} does not exist")
    mpath = ckpt_dir / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"checkpoint {ckpt_dir} is incomplete: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint manifest {mpath} is unreadable ({err})") from None
    for rel, meta in files.items():
        p = ckpt_dir / rel
        if not p.is_file():
            raise CheckpointError(f"checkpoint file {p} is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"checkpoint file {p} has {size} bytes, its manifest says {meta['size']} "
                                  f"(truncated or overwritten)")
        if hashes and _sha256(p) != meta["sha256"]:
            raise CheckpointError(f"checkpoint file {p} does not match the SHA-256 in its manifest (corrupt)")
    if STATE_FILE not in files:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {STATE_FILE}")
    return manifest


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every ``ckpt-XXXXXXXX`` folder in ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    return sorted((int(m.group(1)), p) for p in run_dir.iterdir() if (m := _NAME.match(p.name)) and p.is_dir())


def find_latest(run_dir: str | Path, hashes: bool = True) -> Path | None:
    """The newest intact checkpoint in ``run_dir`` (None if there is none); logs a warning for each newer
    checkpoint that failed verification."""
    for _, path in reversed(_checkpoints(Path(run_dir))):
        try:
            verify_checkpoint(path, hashes=hashes)
        except CheckpointError as err:
            log.warning("resume=auto skips %s: %s", path.name, err)
            continue
        return path
    return None


def clean_leftovers(run_dir: str | Path) -> list[Path]:
    """Delete ``ckpt-*.tmp`` folders and ``*.tmp`` files that a killed save left in ``run_dir``; returns them."""
    run_dir = Path(run_dir)
    gone = []
    if not run_dir.is_dir():
        return gone
    for p in run_dir.iterdir():
        if p.name.endswith(".tmp"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            gone.append(p)
            log.warning("removed %s, left over from an interrupted save", p)
    return gone


def _why(err: BaseException) -> str:
    """One line for a failed write: the errno name and text, e.g. "EFBIG: File too large"."""
    code = getattr(err, "errno", None)
    if code is None and isinstance(err.__cause__ or err.__context__, OSError):
        code = (err.__cause__ or err.__context__).errno
    if code:
        return f"{errno.errorcode.get(code, code)}: {os.strerror(code)}"
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}"


class CheckpointManager:
    """Save/restore full training state through an ``accelerate.Accelerator``.

    Args:
        accelerator: the run's accelerator (collective: every rank calls ``save``/``load``).
        run_dir: directory holding ``ckpt-*`` folders.
        keep_last: how many intact checkpoints to keep (older ones are deleted after a save).
    """

    def __init__(self, accelerator, run_dir: str | Path, keep_last: int = 2):
        self.acc = accelerator
        self.run_dir = Path(run_dir)
        self.keep_last = max(1, keep_last)

    def save(self, step: int, trainer_state: dict[str, Any], config: dict | None = None) -> Path:
        """Write the checkpoint of optimizer step ``step``; returns its final path.

        Raises:
            CheckpointError: the run directory cannot take it (read-only, disk full, file size limit); the
            partial ``.tmp`` folder is removed and earlier checkpoints are untouched.
        """
        final = self.run_dir / f"ckpt-{step:08d}"
        tmp = self.run_dir / f"ckpt-{step:08d}.tmp"
        try:
            if self.acc.is_main_process and tmp.exists():
                shutil.rmtree(tmp)
            self.acc.wait_for_everyone()
            self.acc.save_state(str(tmp), safe_serialization=True)
            if self.acc.is_main_process:
                (tmp / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
                if config is not None:
                    (tmp / "config.json").write_text(json.dumps(config, indent=2))
            self.acc.wait_for_everyone()  # every rank's shards are on disk before the manifest hashes them
            if self.acc.is_main_process:
                write_manifest(tmp, step)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(tmp, final)
                self._prune(step)
                log.info("saved checkpoint %s", final)
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            if self.acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"cannot write checkpoint {final} ({_why(err)}); earlier checkpoints are intact: "
                                  f"free space or fix permissions, then resume with train.resume=auto") from err
        self.acc.wait_for_everyone()
        return final

    def _prune(self, saved_step: int) -> None:
        intact = []
        for step, path in _checkpoints(self.run_dir):
            if step > saved_step:  # a timeline abandoned by resuming from an older checkpoint
                log.warning("deleting %s: newer than the checkpoint just saved, from an abandoned run", path.name)
                shutil.rmtree(path, ignore_errors=True)
            elif (path / MANIFEST).is_file():
                intact.append(path)
            elif step < saved_step:
                shutil.rmtree(path, ignore_errors=True)  # incomplete and superseded
        for old in intact[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def resolve(self, resume: str) -> Path | None:
        """Checkpoint path of a ``resume`` setting: "" (none), "auto" (newest intact in run_dir, None if
        absent), or an explicit directory (must be intact, else ``CheckpointError``)."""
        if not resume:
            return None
        if resume == "auto":
            return find_latest(self.run_dir)
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"resume={resume!r}: no such checkpoint directory; use train.resume=auto or a "
                                  f"ckpt-XXXXXXXX folder")
        verify_checkpoint(path)
        return path

    def load(self, path: Path) -> dict[str, Any]:
        """Restore model/optimizer/RNG/registered objects from ``path``; returns its trainer state."""
        try:
            self.acc.load_state(str(path))
        except Exception as err:  # a file that passed the manifest check but does not fit this model
            raise CheckpointError(f"cannot load checkpoint {path}: {type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else ''}") from err
        state = json.loads((Path(path) / STATE_FILE).read_text())
        log.info("resumed from %s at step %d", path, state["step"])
        return state
