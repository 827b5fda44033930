"""Zero-shot text-to-video and video-to-text retrieval of a stage-2 checkpoint.

    python -m fluxvit.stages.videotext.retrieval --checkpoint runs/pretrain/videotext/videotext.safetensors
    python -m fluxvit.stages.videotext.retrieval --checkpoint CKPT --data shards:/data/msrvtt/test-{000..009}.tar \\
        --budgets 2048 1024 --settings 8x224 16x224 --dual-softmax      # InternVideo2's DSL, tau = 1
    python -m fluxvit.stages.videotext.retrieval --checkpoint CKPT --data msrvtt:test.json:/data/videos

Inputs: ``synthetic`` (the embedded corpus's split, generated under ``--root`` when absent), ``shards:SPEC``
(WebDataset video shards, one caption per video), or ``msrvtt:ANNOTATIONS.json:VIDEO_DIR`` (a JSON list of
``{"video": relative path, "caption": str or [str]}``; every caption is a query). Each (frames x resolution)
setting is decoded once (segment-middle frames, resize + centre crop) and encoded at every token budget.
Prints a Markdown table (both directions, each budget, chance level) headed by its protocol and writes JSON.

Protocols (``fluxvit.metrics.retrieval_metrics``): "plain" ranks the cosine similarity; ``--dual-softmax [TAU]``
is InternVideo2's dual softmax (``tasks_clip/retrieval_utils.py``, which the paper's Table 9 reports): T2V ranks
``sim * softmax(sim / tau)`` taken over the texts of each video, V2T the same taken over the videos of each text,
tau = 1 on cosine similarity by default.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from fluxvit.datasets import EvalTransform, decode_clips
from fluxvit.datasets.synth import ensure_synthetic_corpus
from fluxvit.metrics import chance_recall, retrieval_metrics, retrieval_protocol

from ..common.cli import OneLineParser, token_budget
from fluxvit.datasets import DataConfig
from ..common.data import build_loader
from .task import load_videotext

__all__ = ["RetrievalSet", "corpus_splits", "evaluate_retrieval", "format_table", "load_retrieval_set", "main"]

log = logging.getLogger("fluxvit.eval")
DEFAULT_CHECKPOINT = "runs/pretrain/videotext/videotext.safetensors"


@dataclass
class RetrievalSet:
    """Decoded clips of one (frames, resolution) setting and their captions.

    videos: N tensors (3, T, R, R) normalised; texts: M captions; text_to_video: (M,) video index per caption.
    """

    videos: list
    texts: list
    text_to_video: list
    keys: list


def _from_shards(shards: str, frames: int, res: int, max_videos: int, data: DataConfig) -> RetrievalSet:
    loader = build_loader(data, shards, train=False, num_frames=frames, img_size=res, batch_size=16)
    videos, texts, keys = [], [], []
    for batch in loader:
        video = batch["video"]
        clips = list(video) if isinstance(video, (list, tuple)) else list(video.unbind(0))
        for clip, caption, key in zip(clips, batch["caption"], batch["key"]):
            if not caption:
                continue  # a video without a caption cannot be a retrieval target
            videos.append(clip)
            texts.append(caption)
            keys.append(key)
        if max_videos and len(videos) >= max_videos:
            break
    if max_videos:
        videos, texts, keys = videos[:max_videos], texts[:max_videos], keys[:max_videos]
    return RetrievalSet(videos, texts, list(range(len(videos))), keys)


def _from_annotations(ann_path: str, video_dir: str, frames: int, res: int, max_videos: int, normalize: str,
                      decoder: str = "decord") -> RetrievalSet:

    entries = json.loads(Path(ann_path).read_text())
    if not isinstance(entries, list):
        raise ValueError(f"{ann_path}: expected a JSON list of {{'video': ..., 'caption': ...}}")
    transform = EvalTransform(1, normalize)
    videos, texts, t2v, keys = [], [], [], []
    for entry in entries[: max_videos or None]:
        data = (Path(video_dir) / entry["video"]).read_bytes()
        clip = decode_clips(data, frames, backend=decoder, sampling="middle")[0]
        videos.append(transform(clip, res)[0])
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        for c in captions:
            texts.append(c)
            t2v.append(len(videos) - 1)
        keys.append(entry["video"])
    return RetrievalSet(videos, texts, t2v, keys)


def corpus_splits(root: str) -> dict:
    """Shard patterns per split of the synthetic corpus in ``root`` (generated with the defaults when absent)."""
    return {split: v["shards"] for split, v in ensure_synthetic_corpus(root)["splits"].items()}


def load_retrieval_set(data: str, frames: int, res: int, *, root: str = "data/synthetic", split: str = "test",
                       max_videos: int = 0, normalize: str = "imagenet",
                       options: DataConfig | None = None) -> RetrievalSet:
    """Decode the evaluation videos of ``data`` (see the module docstring) at one (frames, res) setting.

    ``options``: the loader knobs (decoder, workers, ...) of a stage's data section; default: a ``DataConfig``
    with ``normalize``.
    """
    options = options or DataConfig(normalize=normalize)
    if data == "synthetic":
        splits = corpus_splits(root)
        if split not in splits:
            raise ValueError(f"the synthetic corpus in {root} has no {split!r} split")
        return _from_shards(splits[split], frames, res, max_videos, options)
    if data.startswith("shards:"):
        return _from_shards(data[len("shards:"):], frames, res, max_videos, options)
    if data.startswith("msrvtt:"):
        _, ann, video_dir = data.split(":", 2)
        return _from_annotations(ann, video_dir, frames, res, max_videos, options.normalize, options.decoder)
    raise ValueError(f"unknown --data {data!r}: use synthetic, shards:SPEC or msrvtt:ANNOTATIONS.json:VIDEO_DIR")


@torch.no_grad()
def encode_set(model, tower, rset: RetrievalSet, budgets: Sequence[int], batch_size: int = 16,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict]:
    """Text embeddings (M, E) and, per budget, video embeddings (N, E) of a retrieval set."""
    text = torch.cat([model.encode_text_features(tower(rset.texts[i:i + 64]).to(device))
                      for i in range(0, len(rset.texts), 64)])
    videos = {}
    for budget in budgets:
        chunks = []
        for i in range(0, len(rset.videos), batch_size):
            clips = [c.to(device) for c in rset.videos[i:i + batch_size]]
            same = len({tuple(c.shape) for c in clips}) == 1
            chunks.append(model.encode_video(torch.stack(clips) if same else clips, num_tokens=budget))
        videos[budget] = torch.cat(chunks)
    return text, videos


def evaluate_retrieval(model, tower, rset: RetrievalSet, budgets: Sequence[int],
                       dual_softmax_temperature: float | None = None, device="cpu") -> dict:
    """Metrics per budget: ``{budget: retrieval_metrics(...) + kept tokens + chance + protocol}`` on one setting.

    ``dual_softmax_temperature``: None scores the plain cosine similarity; tau applies InternVideo2's dual
    softmax (``fluxvit.metrics.dual_softmax``; tau = 1 is InternVideo2's choice)."""
    text, videos = encode_set(model, tower, rset, budgets, device=device)
    out = {}
    n = len(rset.videos)
    for budget, video in videos.items():
        m = retrieval_metrics(text.float().cpu() @ video.float().cpu().T, rset.text_to_video,
                              dual_softmax_temperature=dual_softmax_temperature)
        tokens = rset.videos[0].shape[1] * (rset.videos[0].shape[2] // 14) * (rset.videos[0].shape[3] // 14)
        m.update(budget=budget, kept_tokens=min(budget, tokens), num_videos=n, num_texts=len(rset.texts),
                 protocol=retrieval_protocol(dual_softmax_temperature),
                 chance_r1=chance_recall(n, 1), chance_r5=chance_recall(n, 5), chance_r10=chance_recall(n, 10))
        out[budget] = m
    return out


def format_table(results: list[dict]) -> str:
    """Markdown table of result rows (each with setting, budget, protocol and the metric keys), headed by a line
    naming the scoring protocol(s)."""
    protocols = sorted({r.get("protocol", "plain") for r in results})
    head = (f"Scoring: {', '.join(protocols)}.\n\n""| frames x res | budget | kept | T2V R@1 | R@5 | R@10 | MdR | V2T R@1 | R@5 | R@10 | MdR | "
            "chance R@1 |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [f"| {r['setting']} | {r['budget']} | {r['kept_tokens']} | {r['t2v_r1']:.1f} | {r['t2v_r5']:.1f} | "
            f"{r['t2v_r10']:.1f} | {r['t2v_medr']:.1f} | {r['v2t_r1']:.1f} | {r['v2t_r5']:.1f} | {r['v2t_r10']:.1f} | "
            f"{r['v2t_medr']:.1f} | {r['chance_r1']:.2f} |" for r in results]
    return "\n".join([head, *rows])


def _setting(text: str) -> tuple[int, int]:
    try:
        frames, res = text.lower().split("x")
        return int(frames), int(res)
    except ValueError:
        raise argparse.ArgumentTypeError(f"setting must look like 8x224, got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the JSON report."""
    p = OneLineParser(prog="python -m fluxvit.stages.videotext.retrieval",
                                description="Zero-shot video-text retrieval of a stage-2 checkpoint",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--data", default="synthetic")
    p.add_argument("--root", default="data/synthetic", help="synthetic corpus folder (generated when absent)")
    p.add_argument("--split", default="test")
    p.add_argument("--budgets", type=token_budget, nargs="+", default=None, help="token budgets (>= 1)")
    p.add_argument("--settings", type=_setting, nargs="+", default=None, help="FRAMESxRES, e.g. 8x224")
    p.add_argument("--dual-softmax", type=float, nargs="?", const=1.0, default=None, metavar="TAU",
                   help="InternVideo2's dual softmax with temperature TAU (default 1 on cosine similarity); "
                        "without it the plain similarity is ranked")
    p.add_argument("--max-videos", type=int, default=0)
    p.add_argument("--out", default="", help="JSON output (default: beside the checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--decoder", default="decord", choices=("decord", "pyav", "torchcodec"),
                   help="video decoder (a missing one falls back to PyAV)")
    p.add_argument("--workers", type=int, default=0, help="decoding worker processes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        p.error(f"checkpoint {ckpt} not found; run `make pretrain` first or pass --checkpoint")
    model, tower = load_videotext(ckpt)
    model.to(args.device)
    tower.to(args.device)
    config = _run_config(ckpt)
    budgets = args.budgets or list(config.get("budgets", [2048, 1024]))
    settings = args.settings or [tuple(s) for s in config.get("settings", [[8, 224]])]
    rows = []
    t0 = time.perf_counter()
    for frames, res in settings:
        log.info("decoding %s at %dx%d", args.data, frames, res)
        rset = load_retrieval_set(args.data, frames, res, root=args.root, split=args.split,
                                  max_videos=args.max_videos,
                                  options=DataConfig(decoder=args.decoder, num_workers=args.workers))
        if not rset.videos:
            p.error(f"no captioned videos found in {args.data}")
        for m in evaluate_retrieval(model, tower, rset, budgets, args.dual_softmax, args.device).values():
            rows.append({"setting": f"{frames}x{res}", **m})
    report = {"checkpoint": str(ckpt), "data": args.data, "split": args.split,
              "dual_softmax_temperature": args.dual_softmax, "protocol": retrieval_protocol(args.dual_softmax),
              "results": rows, "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out) if args.out else ckpt.with_name("retrieval.json")
    out.write_text(json.dumps(report, indent=2))
    sys.stdout.write(f"\nZero-shot retrieval on {args.data} ({args.split}), {rows[0]['num_videos']} videos, "
                     f"{rows[0]['num_texts']} captions\n\n{format_table(rows)}\n\nwrote {out}\n")
    return report


def _run_config(ckpt: Path) -> dict:
    """Retrieval settings of the run that wrote ``ckpt`` (its saved config), if any."""
    for name in ("config.json",):
        path = ckpt.parent / name
        if path.is_file():
            try:
                return json.loads(path.read_text()).get("retrieval", {})
            except ValueError:
                return {}
    return {}


if __name__ == "__main__":
    main()
