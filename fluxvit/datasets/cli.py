"""``fluxvit-data``: make shards, check shards, generate the synthetic corpus.

    fluxvit-data make-shards (--csv FILE | --json FILE | --folder DIR) --out DIR [--samples-per-shard N]
                             [--root DIR] [--classes FILE] [--workers N] [--short-side S]
                             [--keyframe-interval K] [--crf Q] [--max-fps F] [--copy]
    fluxvit-data check SHARDS [--num-frames N] [--decoder NAME] [--json]
    fluxvit-data synth --out DIR [--num-train N ...] [--scale K]

``check`` exits 0 when every sample decoded, 1 when some were skipped (or a shard is truncated / missing) and
2 on a usage error. ``make-shards`` verifies every input by decoding it, re-encodes it for training (or stores
it as it is with ``--copy``), and exits 0 when every input was stored, 1 when some failed (each is listed), 2 on a
usage error; a killed run resumes where it stopped (complete shards are skipped).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Iterator, Sequence

from .config import DataConfig
from .decoders import BACKENDS
from .samples import SampleError, process_sample
from .prepare import Encoding, make_shards, read_classes
from .shards import VIDEO_EXTENSIONS, ShardReader, parse_shard_spec, shard_sizes
from .synth import make_synthetic_corpus

__all__ = ["main", "read_csv_list", "read_json_list", "read_folder", "check_shards"]

log = logging.getLogger("fluxvit.datasets.cli")


# -- inputs -----------------------------------------------------------------------------------------------------
# Header names a CSV may use (video2dataset, WebVid, Kinetics lists), first match wins per field.
CSV_COLUMNS = {
    "video": ("path", "video", "video_path", "filepath", "filename", "file", "videoid", "video_id", "youtube_id",
              "contentUrl", "url"),
    "caption": ("caption", "text", "name", "title", "description"),
    "label": ("label", "class", "category"),
}


def read_csv_list(path: str | Path) -> Iterator[dict]:
    """Items ``{"video", "label", "caption"}`` of a CSV list.

    With a header (its first row names a known path column, any case), every column it understands is kept: the
    path (``path``, ``video``, ``filename``, ..., ``videoid`` / ``contentUrl`` as video2dataset and WebVid write
    them), ``caption`` (also ``text``, and ``name`` as WebVid names it) and ``label``; the columns it does not use
    are reported once (a warning), not silently dropped. Without a header: Kinetics-style ``path,label`` rows.

    Raises:
        ValueError: a header without a path column.
    """
    with open(path, newline="") as f:
        rows = csv.reader(f)
        first = next(rows, None)
        while first is not None and not any(c.strip() for c in first):
            first = next(rows, None)
        if first is None:
            return
        header = [c.strip() for c in first]
        lower = [c.lower() for c in header]
        known = {a.lower() for names in CSV_COLUMNS.values() for a in names}
        if not any(c in known for c in lower):  # no header: the first row is data
            rows_iter, cols = _chain([first], rows), None
        else:
            cols = {}
            for field, names in CSV_COLUMNS.items():
                for name in names:
                    if name.lower() in lower:
                        cols[field] = lower.index(name.lower())
                        break
            if "video" not in cols:
                raise ValueError(f"{path}: the header {header} names no path column "
                                 f"(one of {', '.join(CSV_COLUMNS['video'])})")
            unused = [h for i, h in enumerate(header) if i not in cols.values()]
            if unused:
                log.warning("%s: columns not used: %s (used: %s)", path, ", ".join(unused),
                            ", ".join(f"{header[i]} as {k}" for k, i in cols.items()))
            rows_iter = rows
        for row in rows_iter:
            if not row or not any(c.strip() for c in row):
                continue
            if cols is None:  # path,label
                if not row[0].strip():
                    continue
                yield {"video": row[0].strip(), "label": row[1].strip() if len(row) > 1 and row[1].strip() else None}
                continue
            cell = {k: (row[i].strip() if i < len(row) else "") for k, i in cols.items()}
            if not cell["video"]:
                continue
            yield {"video": cell["video"], "label": cell.get("label") or None, "caption": cell.get("caption") or None}


def _chain(first: list, rest) -> Iterator[list]:
    yield from first
    yield from rest


def read_json_list(path: str | Path) -> Iterator[dict]:
    """UMT / InternVideo annotation list ``[{"video": path, "caption": str | [str], "label"?: ...}]``."""
    with open(path) as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of {{'video': ..., 'caption': ...}}")
    for item in items:
        yield {"video": item["video"], "caption": item.get("caption"), "label": item.get("label")}


def read_folder(folder: str | Path, skipped: Counter | None = None) -> Iterator[dict]:
    """Every video under ``folder`` (sorted; any case of a :data:`~fluxvit.datasets.shards.VIDEO_EXTENSIONS`
    suffix); a video in ``folder/CLASS/...`` gets label ``CLASS``. Other files are counted in ``skipped``
    (``{"not a video extension (.txt)": n, ...}``)."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"{folder} is not a folder")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix.lower().lstrip(".") not in VIDEO_EXTENSIONS:
            if skipped is not None:
                skipped[f"not a video extension ({path.suffix.lower() or 'none'})"] += 1
            continue
        rel = path.relative_to(root)
        yield {"video": str(path), "label": rel.parts[0] if len(rel.parts) > 1 else None}


# -- check ------------------------------------------------------------------------------------------------------
def check_shards(spec: str, num_frames: int = 8, decoder: str = "decord", img_size: int = 64) -> dict:
    """Decode every sample of ``spec`` as training would; returns ``{"total", "ok", "skipped", "skipped_keys",
    "reasons": {key: reason}, "shard_errors": [{"shard", "reason"}]}``. A truncated or missing shard counts as one
    skipped entry keyed by its URL."""
    cfg = DataConfig(shards=spec, num_frames=num_frames, img_size=img_size, decoder=decoder,
                     num_workers=0)
    rng = random.Random(0)
    report = {"total": 0, "ok": 0, "skipped": 0, "skipped_keys": [], "reasons": {}, "shard_errors": []}

    def skip(key: str, reason: str) -> None:
        report["total"] += 1
        report["skipped"] += 1
        report["skipped_keys"].append(key)
        report["reasons"][key] = reason

    def shard_error(url: str, reason: str) -> None:
        report["shard_errors"].append({"shard": url, "reason": reason})
        skip(url, reason)

    def lost(url: str, n: int) -> None:  # a broken shard of known size: every sample after its break
        report["total"] += n - 1
        report["skipped"] += n - 1

    # webdataset's tar streaming with the loader's handler: broken shards are reported and skipped
    urls = [url for source in parse_shard_spec(spec) for url in source.urls]
    reader = ShardReader(shard_error, shard_sizes(urls) or {}, lost)
    for sample in reader(urls):
        try:
            process_sample(sample, cfg, num_frames=num_frames, size=img_size, rng=rng)
        except SampleError as exc:
            skip(sample["__key__"], str(exc))
            continue
        report["total"] += 1
        report["ok"] += 1
    return report


# -- main -------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fluxvit-data", description="FluxViT video data tools")
    sub = p.add_subparsers(dest="command", required=True)

    mk = sub.add_parser("make-shards", help="write WebDataset shards from a CSV, a JSON list or a folder")
    src = mk.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", help="Kinetics-style CSV: path,label")
    src.add_argument("--json", help='UMT / InternVideo list: [{"video": path, "caption": str or [str]}]')
    src.add_argument("--folder", help="folder of videos (FOLDER/CLASS/video.mp4 gives labels)")
    mk.add_argument("--out", required=True, help="output folder")
    mk.add_argument("--root", help="prefix for relative video paths")
    mk.add_argument("--samples-per-shard", type=int, default=1000)
    enc = Encoding()
    mk.add_argument("--short-side", type=int, default=enc.short_side,
                    help=f"re-encode to H.264 with this shorter side in px (default {enc.short_side})")
    mk.add_argument("--keyframe-interval", type=int, default=enc.keyframe_interval,
                    help=f"frames between keyframes (default {enc.keyframe_interval})")
    mk.add_argument("--crf", type=int, default=enc.crf, help=f"x264 quality, lower is better (default {enc.crf})")
    mk.add_argument("--max-fps", type=float, default=enc.max_fps,
                    help=f"frame-rate cap, 0 keeps the rate (default {enc.max_fps:g})")
    mk.add_argument("--copy", action="store_true", help="store the original bytes (verified, not re-encoded)")
    mk.add_argument("--classes", help="class names (one per line or a JSON list): one label map for every split")
    mk.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    mk.add_argument("--no-progress", action="store_true", help="no progress bar")

    ck = sub.add_parser("check", help="decode every sample as training would and report the skipped ones")
    ck.add_argument("shards", help="shard spec, e.g. 'data/{00000..00009}.tar'")
    ck.add_argument("--num-frames", type=int, default=8)
    ck.add_argument("--decoder", choices=BACKENDS, default="decord")
    ck.add_argument("--json", action="store_true", help="print one JSON object")

    sy = sub.add_parser("synth", help="generate the synthetic video-text corpus")
    sy.add_argument("--out", required=True)
    sy.add_argument("--num-train", type=int, default=1000)
    sy.add_argument("--num-val", type=int, default=100)
    sy.add_argument("--num-test", type=int, default=100)
    sy.add_argument("--scale", type=int, default=1, help="multiply every split's size (a larger corpus)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--num-frames", type=int, default=32)
    sy.add_argument("--size", type=int, default=128)
    sy.add_argument("--samples-per-shard", type=int, default=100)
    sy.add_argument("--workers", type=int, default=None, help="generator processes (default: all cores)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fluxvit-data``; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)

    if args.command == "make-shards":
        if args.samples_per_shard < 1:
            parser.print_usage(sys.stderr)
            print("error: --samples-per-shard must be >= 1", file=sys.stderr)
            return 2
        not_videos: Counter = Counter()
        try:
            items = list(read_csv_list(args.csv) if args.csv else read_json_list(args.json) if args.json
                         else read_folder(args.folder, not_videos))
        except (OSError, ValueError, KeyError) as exc:
            print(f"error: cannot read the input list: {exc}", file=sys.stderr)
            return 2
        try:
            encoding = Encoding(short_side=args.short_side, keyframe_interval=args.keyframe_interval, crf=args.crf,
                                max_fps=args.max_fps, copy=args.copy)
            classes = read_classes(args.classes) if args.classes else None
            if args.workers < 1:
                raise ValueError("--workers must be >= 1")
            result = make_shards(items, Path(args.out), args.samples_per_shard, args.root, encoding, classes,
                                 workers=args.workers, progress=not args.no_progress)
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {result['written']} samples in {len(result['shards']) - result['skipped_shards']} shards to "
              f"{args.out} ({result['skipped_shards']} complete shards kept, {result['retried']} inputs that failed "
              f"before retried, {len(result['failed'])} failed)")
        if not_videos:
            print(f"skipped {sum(not_videos.values())} files under {args.folder}: "
                  + ", ".join(f"{n} {why}" for why, n in sorted(not_videos.items())))
        if result["failed"]:
            print(f"still missing {len(result['failed'])} of {len(items)} inputs (fix them and rerun: they are "
                  "retried, the stored ones kept):")
        for reason in result["failed"]:
            print(f"  failed {reason}")
        return 1 if result["failed"] else 0

    if args.command == "check":
        if args.num_frames < 1:
            print("error: --num-frames must be >= 1", file=sys.stderr)
            return 2
        try:
            parse_shard_spec(args.shards)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        logging.getLogger("fluxvit.datasets").setLevel(logging.ERROR)  # the report lists every skip itself
        report = check_shards(args.shards, args.num_frames, args.decoder)
        if args.json:
            print(json.dumps(report))
        else:
            print(f"total {report['total']}  decoded {report['ok']}  skipped {report['skipped']}")
            for key in report["skipped_keys"]:
                print(f"  skipped {key}: {report['reasons'][key]}")
        return 0 if report["skipped"] == 0 else 1

    if args.command == "synth":
        if min(args.num_train, args.num_val, args.num_test) < 0 or args.scale < 1:
            print("error: sizes must be >= 0 and --scale >= 1", file=sys.stderr)
            return 2
        start = time.perf_counter()
        info = make_synthetic_corpus(args.out, args.num_train * args.scale, args.num_val * args.scale,
                                     args.num_test * args.scale, args.seed, num_frames=args.num_frames,
                                     size=args.size, samples_per_shard=args.samples_per_shard, workers=args.workers)
        for split, s in info["splits"].items():
            print(f"{split}: {s['num_samples']} clips, shards {s['shards']}")
        print(f"synthetic corpus written to {args.out} in {time.perf_counter() - start:.1f} s")
        return 0
    return 2  # unreachable: argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
