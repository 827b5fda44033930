"""``fluxvit-embed``: embed videos with a trained encoder at a token budget, in clip-retrieval's layout.

    fluxvit-embed --model runs/videotext/videotext.safetensors --data videos/ --out emb/ --budget 1024
    fluxvit-embed --model FluxViT_S.pth --arch fluxvit_small_patch14 --data 'shards/{000..009}.tar' --out emb/ \\
        --setting runs/tokenopt/tokenopt.json --budget 1024 --clips 2 --crops 3
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m fluxvit.embed --model M --data D --out E

MODEL: see ``fluxvit.encoders`` (any stage's export, a save_pretrained folder or hub id, an official checkpoint
with ``--arch``, a registered name with ``--weights``). INPUT: a shard spec (``.tar`` with brace ranges,
``;``-joined sources), a folder of videos (every container ``make-shards`` takes, ``fluxvit.datasets.shards.
VIDEO_EXTENSIONS``; a video in ``DIR/CLASS/`` gets label CLASS), or a CSV (``path[,label]``) / JSON
(``[{"video", "caption"?, "label"?}]``) list whose relative paths are taken from the list's folder.

Each video is decoded as the evaluation protocol does (``--clips`` segment-middle clips x ``--crops`` crops of
``--frames`` x ``--resolution``; ``--setting`` takes them from a Token Optimization result for ``--budget``),
every view is encoded at the budget, views are averaged and the mean is L2-normalised. Videos of a batch go to
the model as a list of clips: one packed sequence, no padding, whatever their sizes (``--keep-aspect`` keeps
each video's aspect ratio, so a batch mixes grids).

Output (clip-retrieval's layout)::

    OUT/embed_info.json               model, vector kind, setting: a rerun must match it
    OUT/video_emb/video_emb_N.npy     (rows, dim) float32, L2-normalised
    OUT/metadata/metadata_N.parquet   key, path, caption, label, frames, resolution, budget, tokens, views,
                                      vector, model_sha256 (row i describes row i of video_emb_N)
    OUT/text_emb/text_emb_N.npy       --text: the inputs' captions (zero rows where a video has none)
    OUT/failed/failed_N.jsonl         videos that could not be decoded: key, path, reason
    OUT/failed.jsonl                  all of them (rewritten at the end)
    OUT/ranks/rank_R.json             what process R did in the last run (parts, videos, seconds, world size)

Part N is input shard N, or videos [N * part_size, (N + 1) * part_size) of a folder or list. A part is done when
its parquet exists (written last); a rerun into OUT skips done parts, so no key is written twice, and an
interrupted run resumes. Under ``accelerate launch`` rank r takes parts r, r + world, ... Exit status: 0 when
every video was embedded, 1 when some failed (each listed), 2 on a usage error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch

from .datasets.cli import read_csv_list, read_folder, read_json_list
from .datasets.config import DataConfig
from .datasets.decoders import DecodeError, decode_clips
from .datasets.samples import SampleError, _caption, _label, process_sample
from .datasets.shards import VIDEO_EXTENSIONS, VIDEO_KEYS, ShardReader, parse_shard_spec, shard_sizes
from .datasets.transforms import normalize_stats
from .encoders import load_encoder
from .stages.common.cli import OneLineParser, fail, token_budget_or_all

__all__ = ["EmbedSettings", "InputPart", "embed_videos", "list_parts", "main", "read_setting"]

log = logging.getLogger("fluxvit.embed")
INFO = "embed_info.json"
_MUST_MATCH = ("model_sha256", "vector", "budget", "frames", "resolution", "clips", "crops", "keep_aspect", "data",
               "part_size", "normalize")


# ---------------------------------------------------------------------------------------------------- inputs
@dataclass
class InputPart:
    """One output part: a shard URL, or a slice of a folder / list. ``items``: dicts ``{key, path, caption,
    label}`` for files (None for a shard, whose samples are read when the part is embedded)."""

    index: int
    url: str = ""
    items: Union[list, None] = None


def _is_shard_spec(data: str) -> bool:
    return ".tar" in data or data.startswith(("pipe:", "http://", "https://", "s3://", "gs://"))


def list_parts(data: str, part_size: int = 1000) -> list[InputPart]:
    """The parts of INPUT (see the module docstring), in a fixed order.

    Raises:
        ValueError / FileNotFoundError: INPUT is not a shard spec, folder, .csv or .json list (one line)."""
    path = Path(data)
    if path.is_dir():
        root = path
        items = [{"key": Path(it["video"]).relative_to(root).as_posix(), "path": it["video"], "caption": "",
                  "label": it["label"] or ""} for it in read_folder(root)]
        if not items:
            raise ValueError(f"no videos ({', '.join(VIDEO_EXTENSIONS)}) under {data}")
    elif path.suffix.lower() in (".csv", ".json") and path.is_file():
        rows = read_csv_list(path) if path.suffix.lower() == ".csv" else read_json_list(path)
        items = []
        for row in rows:
            cap = row.get("caption") or ""
            cap = cap[0] if isinstance(cap, list) and cap else cap
            label = row.get("label")
            video = Path(row["video"])
            full = video if video.is_absolute() else path.parent / video
            items.append({"key": row["video"], "path": str(full), "caption": str(cap or ""),
                          "label": "" if label is None else str(label)})
        if not items:
            raise ValueError(f"{data} lists no videos")
    elif _is_shard_spec(data):
        urls = [url for source in parse_shard_spec(data) for url in source.urls]
        return [InputPart(i, url=u) for i, u in enumerate(urls)]
    else:
        raise FileNotFoundError(f"--data {data}: not a folder, a .csv / .json list or a shard spec (*.tar)")
    seen: set = set()
    for it in items:
        if it["key"] in seen:
            raise ValueError(f"{data} lists {it['key']} twice: keys must be unique")
        seen.add(it["key"])
    return [InputPart(i, items=items[s:s + part_size]) for i, s in enumerate(range(0, len(items), part_size))]


def read_setting(path: str, budget: Union[int, None]) -> tuple[int, int, int]:
    """(budget, frames, resolution) of a Token Optimization result (``tokenopt.json``) for ``budget`` (None:
    its only row)."""
    try:
        rows = json.loads(Path(path).read_text())["rows"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--setting {path}: not a Token Optimization result ({type(err).__name__}: {err})") from None
    by_budget = {int(r["budget"]): r for r in rows}
    if budget is None:
        if len(by_budget) != 1:
            raise ValueError(f"--setting {path} has budgets {sorted(by_budget)}: pick one with --budget")
        budget = next(iter(by_budget))
    if budget not in by_budget:
        raise ValueError(f"--setting {path} has no row for budget {budget}; it has {sorted(by_budget)}")
    to = by_budget[budget]["to"]
    return budget, int(to["frames"]), int(to["resolution"])


# --------------------------------------------------------------------------------------------------- decoding
@dataclass
class EmbedSettings:
    """How videos are decoded and encoded (what ``embed_info.json`` records)."""

    budget: Union[int, None] = 2048
    frames: int = 8
    resolution: int = 224
    clips: int = 1
    crops: int = 1
    keep_aspect: bool = False
    decoder: str = "decord"
    normalize: str = "imagenet"
    patch: int = 14


def _aspect_views(clips: list, s: EmbedSettings) -> torch.Tensor:
    """Decoded uint8 clips (T, H, W, 3) -> (V, 3, T, R, W') views keeping the aspect ratio: the short side is
    resized to R, the long side to the nearest multiple of the patch (at most 2R), then centre-cropped."""
    import torch.nn.functional as F

    mean, std = (torch.tensor(v).view(3, 1, 1, 1) for v in normalize_stats(s.normalize))
    views = []
    for clip in clips:
        T, H, W, _ = clip.shape
        scale = s.resolution / min(H, W)
        h, w = max(s.resolution, round(H * scale)), max(s.resolution, round(W * scale))
        x = clip.permute(0, 3, 1, 2).float().div_(255)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
        th = min(h, 2 * s.resolution) // s.patch * s.patch
        tw = min(w, 2 * s.resolution) // s.patch * s.patch
        top, left = (h - th) // 2, (w - tw) // 2
        x = x[:, :, top:top + th, left:left + tw].permute(1, 0, 2, 3)
        views.append((x - mean) / std)
    return views


def _decode(sample: dict, s: EmbedSettings) -> tuple[list, str, str]:
    """(views, caption, label) of one raw sample ``{"__key__", ext: bytes, ...}``; raises SampleError."""
    if not s.keep_aspect:  # the evaluation protocol, exactly: segment-middle clips, resize + centre crop(s)
        cfg = DataConfig(decoder=s.decoder, normalize=s.normalize, decoder_threads=1, num_workers=0)
        out = process_sample(sample, cfg, num_frames=s.frames, size=s.resolution, rng=random.Random(0), train=False,
                             eval_clips=s.clips, eval_crops=s.crops)
        video, caption, label = out["video"], out["caption"], out["label"]
        views = list(video.unbind(0)) if video.dim() == 5 else [video]
    else:
        ext = next((e for e in VIDEO_KEYS if e in sample), None)
        if ext is None or not sample[ext]:
            raise SampleError("no video" if ext is None else "empty video")
        try:
            clips = decode_clips(sample[ext], s.frames, backend=s.decoder, sampling="middle", num_clips=s.clips)
        except DecodeError as exc:
            raise SampleError(f"decode error: {exc}") from None
        views = _aspect_views(clips, s)
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        caption, label = _caption(sample, meta, random.Random(0), False), _label(sample, meta)
    return views, caption or "", "" if label is None or label == -1 else str(label)


class _PartStream(torch.utils.data.IterableDataset):
    """Decoded records of parts, one part per worker at a time (part i -> worker i % workers), each part
    followed by an end marker ``{"part": N, "end": True}``."""

    def __init__(self, parts: list, settings: EmbedSettings):
        self.parts, self.s = parts, settings

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        if info is not None:  # one core per decoding worker
            torch.set_num_threads(1)
        for part in self.parts[wid::nw]:
            yield from self._records(part)
            yield {"part": part.index, "end": True}

    def _records(self, part: InputPart) -> Iterator[dict]:
        if part.items is not None:
            for it in part.items:
                rec = {"part": part.index, "key": it["key"], "path": it["path"], "caption": it["caption"],
                       "label": it["label"]}
                t0 = time.perf_counter()
                try:
                    data = Path(it["path"]).read_bytes()
                    ext = Path(it["path"]).suffix.lower().lstrip(".")
                    sample = {"__key__": it["key"], ext if ext in VIDEO_KEYS else "mp4": data}
                    rec["views"], _, _ = _decode(sample, self.s)
                except OSError as exc:
                    rec["error"] = f"cannot read: {exc.strerror or exc}"
                except SampleError as exc:
                    rec["error"] = str(exc)
                rec["decode_s"] = time.perf_counter() - t0
                yield rec
            return
        errors: list = []
        reader = ShardReader(lambda url, reason: errors.append((url, reason)))
        t0 = time.perf_counter()
        for sample in reader([part.url]):
            rec = {"part": part.index, "key": sample["__key__"], "path": part.url}
            try:
                rec["views"], rec["caption"], rec["label"] = _decode(sample, self.s)
            except SampleError as exc:
                rec.update(error=str(exc), caption="", label="")
            rec["decode_s"] = time.perf_counter() - t0
            yield rec
            t0 = time.perf_counter()
        for url, reason in errors:  # a shard that is missing, truncated or corrupt
            yield {"part": part.index, "key": url, "path": url, "caption": "", "label": "", "error": reason,
                   "decode_s": 0.0}


# ---------------------------------------------------------------------------------------------------- output
def _paths(out: Path, n: int) -> dict:
    return {"emb": out / "video_emb" / f"video_emb_{n}.npy", "meta": out / "metadata" / f"metadata_{n}.parquet",
            "text": out / "text_emb" / f"text_emb_{n}.npy", "failed": out / "failed" / f"failed_{n}.jsonl"}


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _np_save(array: np.ndarray):
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, array)
    return write


def _write_part(out: Path, n: int, rows: list, emb: np.ndarray, text: Union[np.ndarray, None], failed: list,
                columns: dict) -> None:
    """Write part ``n``; the parquet goes last (its presence marks the part done)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = _paths(out, n)
    _atomic(p["failed"], lambda tmp: tmp.write_text("".join(json.dumps(f) + "\n" for f in failed)))
    _atomic(p["emb"], _np_save(emb.astype(np.float32)))
    if text is not None:
        _atomic(p["text"], _np_save(text.astype(np.float32)))
    table = {"key": [r["key"] for r in rows], "path": [r["path"] for r in rows],
             "caption": [r.get("caption", "") for r in rows], "label": [r.get("label", "") for r in rows],
             "tokens": [r["tokens"] for r in rows], "views": [r["views_n"] for r in rows]}
    for name, value in columns.items():
        table[name] = [value] * len(rows)
    schema = pa.schema([("key", pa.string()), ("path", pa.string()), ("caption", pa.string()), ("label", pa.string()),
                        ("tokens", pa.int64()), ("views", pa.int64()),
                        *[(k, pa.int64() if isinstance(v, int) else pa.string()) for k, v in columns.items()]])
    _atomic(p["meta"], lambda tmp: pq.write_table(pa.table(table, schema=schema), tmp))


def done_parts(out: Path) -> set:
    """Indices of the finished parts in ``out`` (metadata and embeddings both present)."""
    meta = out / "metadata"
    if not meta.is_dir():
        return set()
    done = set()
    for f in meta.glob("metadata_*.parquet"):
        n = int(f.stem.split("_")[1])
        if _paths(out, n)["emb"].is_file():
            done.add(n)
    return done


def failed_videos(out: Path) -> list[dict]:
    """Every failed video recorded in ``out`` (all parts, this run's and earlier ones)."""
    rows = []
    for f in sorted((out / "failed").glob("failed_*.jsonl"), key=lambda p: int(p.stem.split("_")[1])):
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


# ---------------------------------------------------------------------------------------------------- engine
@dataclass
class EmbedResult:
    """What one ``embed_videos`` call did on this process."""

    videos: int = 0
    failed: int = 0
    parts_written: list = field(default_factory=list)
    parts_skipped: int = 0
    seconds: float = 0.0
    decode_seconds: float = 0.0
    model_seconds: float = 0.0


def _check_info(out: Path, info: dict, is_main: bool) -> None:
    path = out / INFO
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in _MUST_MATCH if old.get(k) != info.get(k)]
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {info.get(k)!r}" for k in diff)
            raise ValueError(f"{out} holds embeddings of another run ({changes}): use a new --out")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        _atomic(path, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))


def embed_videos(encoder, data: str, out: Union[str, Path], settings: EmbedSettings, *, batch_size: int = 8,
                 workers: int = 0, part_size: int = 1000, text: str = "", device: Union[str, torch.device] = "cpu",
                 rank: int = 0, world_size: int = 1, progress: bool = True) -> EmbedResult:
    """Embed INPUT ``data`` into ``out`` (see the module docstring); this process takes parts ``rank::world_size``.

    Args:
        encoder: a ``fluxvit.encoders.Encoder`` (moved to ``device`` here).
        settings: decode / encode settings; batch_size: videos per packed forward; workers: decoding processes.
        text: "captions" embeds the inputs' captions into ``text_emb/`` (stage-2 models).
    """
    out = Path(out)
    t_start = time.perf_counter()
    if text and not encoder.has_text:
        raise ValueError(f"--text needs a stage-2 (video-text) model; {encoder.source} is {encoder.stage}")
    info = {**encoder.describe(), "data": str(data), "budget": settings.budget, "frames": settings.frames,
            "resolution": settings.resolution, "clips": settings.clips, "crops": settings.crops,
            "keep_aspect": settings.keep_aspect, "part_size": part_size, "text": bool(text),
            "normalize": settings.normalize, "decoder": settings.decoder}
    parts = list_parts(data, part_size)
    _check_info(out, info, rank == 0)
    for leftover in out.glob("*/*.tmp"):  # an interrupted write of this rank's parts
        number = leftover.name.split("_")[-1].split(".")[0]
        if number.isdigit() and int(number) % world_size == rank:
            leftover.unlink(missing_ok=True)
    done = done_parts(out)
    mine = [p for p in parts if p.index % world_size == rank]
    todo = [p for p in mine if p.index not in done]
    result = EmbedResult(parts_skipped=len(mine) - len(todo))
    if result.parts_skipped:
        log.info("rank %d: %d of its %d parts already done in %s", rank, result.parts_skipped, len(mine), out)
    columns = {"frames": settings.frames, "resolution": settings.resolution,
               "budget": settings.budget if settings.budget else 0, "vector": encoder.vector,
               "model_sha256": encoder.model_sha256}
    encoder.to(device)
    stream = _PartStream(todo, settings)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=4 if workers else None)
    if all(p.items is not None for p in todo):
        total = sum(len(p.items) for p in todo)
    else:  # shards: their sizes.json, when there is one
        sizes = shard_sizes([p.url for p in todo])
        total = sum(sizes.values()) if sizes else None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="video", desc=f"embed (rank {rank})", disable=not progress or rank != 0,
               dynamic_ncols=True)
    state: dict = {}
    batch: list = []

    def run_batch() -> None:
        if not batch:
            return
        t0 = time.perf_counter()
        views = [v.to(device, non_blocking=True) for rec in batch for v in rec["views"]]
        emb = encoder.embed(views, settings.budget).cpu()
        at = 0
        for rec in batch:
            n = len(rec["views"])
            mean = emb[at:at + n].mean(0)
            at += n
            rec["emb"] = torch.nn.functional.normalize(mean, dim=0).numpy()
            c, t, h, w = rec["views"][0].shape
            full = t * (h // settings.patch) * (w // settings.patch)
            rec["tokens"] = full if not settings.budget else min(settings.budget, full)
            rec["views_n"] = n
            del rec["views"]
        if text:
            caps = [rec["caption"] for rec in batch]
            have = [i for i, c in enumerate(caps) if c]
            vecs = encoder.embed_text([caps[i] for i in have]).cpu().numpy() if have else None
            for rec in batch:
                rec["text"] = np.zeros(encoder.dim, dtype=np.float32)
            for j, i in enumerate(have):
                batch[i]["text"] = vecs[j]
        result.model_seconds += time.perf_counter() - t0
        batch.clear()

    def finish(n: int) -> None:
        run_batch()
        st = state.pop(n, {"rows": [], "failed": []})
        rows = st["rows"]
        emb = np.stack([r["emb"] for r in rows]) if rows else np.zeros((0, encoder.dim), np.float32)
        txt = (np.stack([r["text"] for r in rows]) if rows else np.zeros((0, encoder.dim), np.float32)) \
            if text else None
        _write_part(out, n, rows, emb, txt, st["failed"], columns)
        result.parts_written.append(n)

    with torch.inference_mode():
        for rec in loader:
            n = rec["part"]
            if rec.get("end"):
                finish(n)
                continue
            st = state.setdefault(n, {"rows": [], "failed": []})
            result.decode_seconds += rec.get("decode_s", 0.0)
            bar.update(1)
            if "error" in rec:
                log.warning("skipped %s: %s", rec["key"], rec["error"])
                st["failed"].append({"key": rec["key"], "path": rec["path"], "reason": rec["error"]})
                result.failed += 1
                continue
            st["rows"].append(rec)
            batch.append(rec)
            result.videos += 1
            if len(batch) >= batch_size:
                run_batch()
    bar.close()
    result.seconds = time.perf_counter() - t_start
    return result


# ---------------------------------------------------------------------------------------------------------- CLI
def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fluxvit-embed", description="Embed videos with a trained FluxViT at a token budget "
                      "(clip-retrieval layout)", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="export of any stage, save_pretrained folder, hub id ORG/NAME, "
                   "official checkpoint (with --arch) or registered name (with --weights)")
    p.add_argument("--arch", default="", help="registered architecture of an official checkpoint")
    p.add_argument("--weights", default="", help="weights file when --model is a registered name")
    p.add_argument("--data", required=True, help="shard spec, folder of videos, or .csv / .json list")
    p.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
    p.add_argument("--budget", type=token_budget_or_all, default=None,
                   help="token budget K (default 2048, or the only budget of --setting); 'all' keeps every token")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (default 8)")
    p.add_argument("--resolution", type=int, default=None, help="crop side in pixels (default 224)")
    p.add_argument("--setting", default="", help="Token Optimization result (tokenopt.json): frames x resolution "
                   "of --budget")
    p.add_argument("--clips", type=int, default=1, help="temporal clips per video (views are averaged)")
    p.add_argument("--crops", type=int, default=1, choices=(1, 3), help="spatial crops per clip")
    p.add_argument("--keep-aspect", action="store_true", help="keep each video's aspect ratio (short side = "
                   "--resolution, long side up to twice it) instead of a square centre crop")
    p.add_argument("--text", action="store_true",
                   help="also embed the inputs' captions into text_emb/ (stage-2 models; rows match video_emb/)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per packed forward")
    p.add_argument("--workers", type=int, default=2, help="decoding processes (0: decode in this process)")
    p.add_argument("--part-size", type=int, default=1000, help="videos per output part (folder / list inputs)")
    p.add_argument("--decoder", default="decord", choices=("decord", "pyav", "torchcodec"))
    p.add_argument("--device", default="", help="cpu, cuda, cuda:1 ... (default: this rank's accelerator)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 all embedded, 1 some failed, 2 usage error)."""
    p = _parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    state = None
    if world > 1:  # under accelerate launch / torchrun: one process group, each rank its own parts
        from accelerate import PartialState
        from accelerate.utils import parse_flag_from_env

        # PartialState alone ignores ACCELERATE_USE_CPU (only AcceleratorState reads it): pass it on, or two
        # CPU processes would each believe they are alone and embed every part
        state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())
        if state.num_processes != world:
            fail(f"launched {world} processes but accelerate formed a group of {state.num_processes} "
                 f"({state.distributed_type.value}); on CPU use ACCELERATE_USE_CPU=1 with --multi_gpu", 2, p.prog)
        rank, world = state.process_index, state.num_processes
    if rank:
        logging.getLogger().setLevel(logging.WARNING)
    device = args.device or (str(state.device) if state is not None else
                             ("cuda" if torch.cuda.is_available() else "cpu"))
    for name in ("clips", "batch_size", "part_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1", 2, p.prog)
    try:
        budget = None if args.budget is None else args.budget
        frames, res = args.frames or 8, args.resolution or 224
        if args.setting:
            budget, frames, res = read_setting(args.setting, budget)
            if args.frames or args.resolution:
                log.warning("--setting %s sets %d x %d; --frames / --resolution ignored", args.setting, frames, res)
            log.info("setting from %s: budget %d at %d frames x %d px", args.setting, budget, frames, res)
        elif budget is None:
            budget = 2048
        if frames < 1 or res < 14:
            raise ValueError(f"--frames must be >= 1 and --resolution >= 14, got {frames} and {res}")
        encoder = load_encoder(args.model, args.arch, args.weights)
        encoder.to(dtype=getattr(torch, args.dtype))
        settings = EmbedSettings(budget=budget or None, frames=frames, resolution=res, clips=args.clips,
                                 crops=args.crops, keep_aspect=args.keep_aspect, decoder=args.decoder,
                                 normalize=encoder.normalize, patch=encoder.net.config.patch_size)
        log.info("model %s (%s): %s, dim %d", args.model, encoder.stage, encoder.vector, encoder.dim)
        result = embed_videos(encoder, args.data, args.out, settings, batch_size=args.batch_size,
                              workers=args.workers, part_size=args.part_size, text="captions" if args.text else "",
                              device=device, rank=rank, world_size=world, progress=not args.no_progress)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err), 2, p.prog)
    log.info("rank %d: %d videos embedded, %d failed, %d parts written, %d skipped (done before) in %.1f s "
             "(decode %.1f s summed over workers, model %.1f s)", rank, result.videos, result.failed,
             len(result.parts_written), result.parts_skipped, result.seconds, result.decode_seconds,
             result.model_seconds)
    stats = {"rank": rank, "world_size": world, "videos": result.videos, "failed": result.failed,
             "parts_written": result.parts_written, "parts_skipped": result.parts_skipped,
             "seconds": round(result.seconds, 3), "decode_seconds": round(result.decode_seconds, 3),
             "model_seconds": round(result.model_seconds, 3)}
    _atomic(Path(args.out) / "ranks" / f"rank_{rank}.json", lambda tmp: tmp.write_text(json.dumps(stats) + "\n"))
    if state is not None:
        state.wait_for_everyone()
    failed = failed_videos(Path(args.out))
    if rank == 0:
        out = Path(args.out)
        _atomic(out / "failed.jsonl", lambda tmp: tmp.write_text("".join(json.dumps(f) + "\n" for f in failed)))
        keys = _all_keys(out)
        if len(keys) != len(set(keys)):
            log.warning("%d keys appear more than once in %s (the input repeats them)", len(keys) - len(set(keys)),
                        out)
        sys.stdout.write(f"embedded {len(keys)} videos into {out} ({len(failed)} failed)\n")
        for f in failed:
            sys.stdout.write(f"  failed {f['key']}: {f['reason']}\n")
    return 1 if failed else 0


def _all_keys(out: Path) -> list:
    import pyarrow.parquet as pq

    keys: list = []
    for f in sorted((out / "metadata").glob("metadata_*.parquet")):
        keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return keys


def cli() -> None:
    """Console-script entry point (``fluxvit-embed``)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
