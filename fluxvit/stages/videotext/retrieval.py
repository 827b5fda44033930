"""Zero-shot text-to-video and video-to-text retrieval of a stage-2 checkpoint.

    python -m fluxvit.stages.videotext.retrieval      # make pretrain's export, with its run's settings
    python -m fluxvit.stages.videotext.retrieval RUN/videotext.safetensors \\
        --set data.source=shards --set data.val_shards='/data/msrvtt/test-{000..009}.tar'
    python -m fluxvit.stages.videotext.retrieval CKPT --set data.source=annotations \\
        --set data.val_shards=test.json --set data.root=/data/videos --set retrieval.budgets=[2048,1024]

Everything comes from the trained run's saved config (``config.json`` beside the checkpoint; else ``--preset``):
the data section (``data.source``, ``data.val_shards`` / the synthetic corpus's ``retrieval.split``, decoder,
workers, normalisation) and the ``retrieval`` section (``budgets``, ``settings`` as ``[[frames, resolution], ...]``,
``dual_softmax``, ``dual_softmax_temperature``, ``max_videos``, ``split``); ``--set`` overrides single fields.
Data: shards (one caption per video), the synthetic corpus, or an annotation list (``data.source=annotations``:
``data.val_shards`` a JSON list of ``{"video": path relative to data.root, "caption": str or [str]}``; every
caption is a query). Each (frames x resolution) setting is decoded once (segment-middle frames, resize + centre
crop) and encoded at every token budget. Prints a Markdown table (both directions, each budget, chance level)
headed by its protocol and writes JSON.

Protocols (``fluxvit.metrics.retrieval_metrics``): "plain" ranks the cosine similarity; with
``retrieval.dual_softmax`` (the paper presets, as Table 9 reports) InternVideo2's dual softmax
(``tasks_clip/retrieval_utils.py``): T2V ranks ``sim * softmax(sim / tau)`` taken over the texts of each video,
V2T the same taken over the videos of each text, tau = ``retrieval.dual_softmax_temperature`` (1 on cosine
similarity).
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from fluxvit.datasets import DataConfig, DecodeError, EvalTransform, decode_clips
from fluxvit.datasets.decoders import clean_reason
from fluxvit.datasets.synth import ensure_synthetic_corpus
from fluxvit.metrics import chance_recall, retrieval_metrics, retrieval_protocol, rounded

from ..common.cli import check_budgets, fail, print_config, resolve_tool_config, tool_parser
from ..common.config import ConfigError
from ..common.data import AnnotationList, as_clips, build_loader, build_source
from .config import presets
from .task import load_videotext

__all__ = ["RetrievalSet", "corpus_splits", "dual_softmax_tau", "evaluate_retrieval", "format_table", "load_retrieval_set",
           "main", "protocol_of"]

log = logging.getLogger("fluxvit.eval")


@dataclass
class RetrievalSet:
    """Decoded clips of one (frames, resolution) setting and their captions.

    videos: N tensors (3, T, R, R) normalised; texts: M captions; text_to_video: (M,) video index per caption;
    skipped: the listed videos that could not be read or decoded (name -> reason), left out with their captions.
    """

    videos: list
    texts: list
    text_to_video: list
    keys: list
    skipped: dict = field(default_factory=dict)  # video name -> reason (missing or undecodable), not evaluated


def _from_shards(shards: str, frames: int, res: int, max_videos: int, data: DataConfig) -> RetrievalSet:
    loader = build_loader(data, shards, train=False, num_frames=frames, img_size=res, batch_size=16)
    videos, texts, keys = [], [], []
    for batch in loader:
        for clip, caption, key in zip(as_clips(batch["video"]), batch["caption"], batch["key"]):
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
    skipped: dict = {}
    for entry in entries[: max_videos or None]:
        try:
            data = (Path(video_dir) / entry["video"]).read_bytes()
            clip = decode_clips(data, frames, backend=decoder, sampling="middle")[0]
        except (OSError, DecodeError) as exc:  # a missing or broken video is left out, by name, and counted
            reason = clean_reason(exc if isinstance(exc, DecodeError) else f"cannot read: {exc.strerror or exc}")
            skipped[str(entry["video"])] = reason
            if len(skipped) <= 5:
                log.warning("skipped %s: %s", entry["video"], reason)
            continue
        videos.append(transform(clip, res)[0])
        captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
        for c in captions:
            texts.append(c)
            t2v.append(len(videos) - 1)
        keys.append(entry["video"])
    if skipped:
        log.warning("%d of the annotation list's videos skipped (missing or undecodable); evaluated on %d",
                    len(skipped), len(videos))
    return RetrievalSet(videos, texts, t2v, keys, skipped)


def corpus_splits(root: str) -> dict:
    """Shard patterns per split of the synthetic corpus in ``root`` (generated with the defaults when absent)."""
    return {split: v["shards"] for split, v in ensure_synthetic_corpus(root)["splits"].items()}


def load_retrieval_set(data: DataConfig, split: str, frames: int, res: int, max_videos: int = 0) -> RetrievalSet:
    """Decode the evaluation videos of ``split`` of a data section at one (frames, res) setting, with its decoder,
    workers and normalisation: shards (``data.val_shards``; "train": ``data.shards``), the synthetic corpus's split,
    or an annotation list (``data.source=annotations``).

    Raises:
        ConfigError: the section names no captioned videos for ``split``.
    """
    source = build_source(data)
    if isinstance(source, AnnotationList):
        if not source.split_list(split):
            raise ConfigError("data.source=annotations needs data.val_shards (the JSON list) and data.root")
        return _from_annotations(source.split_list(split), data.root, frames, res, max_videos, data.normalize,
                                 data.decoder)
    shards = getattr(source, "split_shards", None)
    if shards is None:
        raise ConfigError(f"data.source={data.source} renders clips without files; retrieval reads captioned videos: "
                          f"shards, synthetic-corpus or annotations")
    if not shards(split):
        raise ConfigError(f"no videos for split {split!r}: set data.val_shards (or data.source=synthetic-corpus with "
                          f"data.root)")
    return _from_shards(shards(split), frames, res, max_videos, data)


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


def dual_softmax_tau(r) -> float | None:
    """The dual-softmax temperature of a ``retrieval`` section (None: the plain cosine similarity)."""
    return float(r.dual_softmax_temperature) if r.dual_softmax else None


def protocol_of(r) -> str:
    """The scoring protocol of a ``retrieval`` section, as reports name it ("plain", "DSL tau=1")."""
    return retrieval_protocol(dual_softmax_tau(r))


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the JSON report."""
    p = tool_parser("python -m fluxvit.stages.videotext.retrieval",
                    "Zero-shot video-text retrieval of a stage-2 checkpoint, with the run's own settings and protocol",
                    presets, default_preset="demo", epilog=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        cfg, ckpt, origin = resolve_tool_config(args, presets)
        if args.print_config:
            return print_config(cfg)
        r = cfg.retrieval
        budgets = check_budgets("retrieval.budgets", r.budgets)
        settings = [(int(f), int(res)) for f, res in r.settings]
        tau, protocol = dual_softmax_tau(r), protocol_of(r)
        if not ckpt.is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} not found; run `make pretrain` first or name one")
        log.info("retrieval of %s with %s; protocol %s", ckpt, origin, protocol)
        model, tower = load_videotext(ckpt)
        model.to(args.device)
        tower.to(args.device)
        rows = []
        skipped: dict = {}
        t0 = time.perf_counter()
        for frames, res in settings:
            log.info("decoding %s (%s) at %dx%d", cfg.data.source, r.split, frames, res)
            rset = load_retrieval_set(cfg.data, r.split, frames, res, r.max_videos)
            skipped.update(rset.skipped)
            if not rset.videos:
                raise ConfigError(f"no captioned videos in data.source={cfg.data.source} split {r.split}"
                                  + (f" ({len(rset.skipped)} skipped, e.g. {next(iter(rset.skipped.items()))})"
                                     if rset.skipped else ""))
            for m in evaluate_retrieval(model, tower, rset, budgets, tau, args.device).values():
                rows.append({"setting": f"{frames}x{res}", **m})
    except ConfigError as err:
        fail(str(err), 2, p.prog)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err), 1, p.prog)
    data = cfg.data.val_shards if r.split != "train" else cfg.data.shards
    report = {"checkpoint": str(ckpt), "config": origin, "source": cfg.data.source, "data": data or cfg.data.root,
              "split": r.split, "dual_softmax_temperature": tau, "protocol": protocol, "results": rounded(rows),
              "skipped_videos": len(skipped), "skipped": skipped, "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out) if args.out else ckpt.with_name("retrieval.json")
    out.write_text(json.dumps(report, indent=2))
    sys.stdout.write(f"\nZero-shot retrieval on {cfg.data.source} {report['data']} ({r.split}), {rows[0]['num_videos']} "
                     f"videos, {rows[0]['num_texts']} captions, protocol {protocol}"
                     + (f"; {len(skipped)} listed videos skipped (missing or undecodable, named in {out})"
                        if skipped else "") + f"\n\n{format_table(rows)}\n\n"
                     f"wrote {out}\n")
    return report


if __name__ == "__main__":
    main()
