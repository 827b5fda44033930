"""``fluxvit-search``: a faiss index over a ``fluxvit-embed`` folder, queried with text or a video.

    fluxvit-search index emb/                                  # build emb/index/ (also done by the first query)
    fluxvit-search query emb/ --text "a person juggling" -k 5  # stage-2 model: the text tower embeds the query
    fluxvit-search query emb/ --video clip.mp4 --json          # any model: the video is embedded as emb/ was

The index is exact (``IndexFlatIP``: inner product of L2-normalised rows = cosine similarity) up to
``--ivf-above`` rows (default ``IVF_ABOVE``, measured by ``benchmarks/bench_search.py``), and an inverted-file
index (``IndexIVFFlat``, sqrt-scaled lists, ``nprobe`` lists searched per query) beyond that. The query is
embedded with the model and the settings recorded in ``emb/embed_info.json`` (budget, frames x resolution,
views), so a video query sees the same protocol as the indexed videos. ``--model`` overrides the model path (it
must be the same weights: its SHA-256 is checked). faiss-cpu is an optional dependency: ``pip install
'fluxvit[embed]'``.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch

from .datasets.samples import SampleError
from .embed import EmbedSettings, _decode, done_parts
from .encoders import load_encoder
from .stages.common.cli import OneLineParser, fail

__all__ = ["IVF_ABOVE", "EmbeddingIndex", "build_index", "load_index", "main"]

log = logging.getLogger("fluxvit.search")
# Rows above which the index is IVF instead of exact. benchmarks/bench_search.py (512 dims, one thread, on the
# shared 2-core development machine): exact 2.4 ms a query at 10k rows, 71 ms at 50k; IVF (sqrt(n) lists, 16
# probed) 0.6 / 4.6 ms with recall@1 0.985 / 1.0 against exact. Exact search is kept while it is interactive.
IVF_ABOVE = 50_000
INDEX_DIR = "index"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("fluxvit-search needs faiss-cpu: pip install 'fluxvit[embed]' (or pip install "
                          "faiss-cpu)") from None
    return faiss


@dataclass
class EmbeddingIndex:
    """A faiss index over an embedding folder's rows with their keys and paths (row i = keys[i])."""

    index: object
    keys: list
    paths: list
    kind: str
    parts: list

    def search(self, queries: Union[np.ndarray, torch.Tensor], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(Q, dim) L2-normalised queries -> (scores (Q, k), row indices (Q, k)); -1 rows where fewer exist."""
        q = queries.detach().cpu().numpy() if isinstance(queries, torch.Tensor) else np.asarray(queries)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.index.d:
            raise ValueError(f"queries must have shape (Q, {self.index.d}), got {tuple(q.shape)}")
        return self.index.search(q, min(k, len(self.keys)))

    def top(self, query, k: int = 10) -> list[dict]:
        """Top-k hits of one query vector: ``[{"rank", "key", "score", "path"}]``."""
        scores, rows = self.search(np.asarray(query, dtype=np.float32).reshape(1, -1), k)
        return [{"rank": r + 1, "key": self.keys[i], "score": float(s), "path": self.paths[i]}
                for r, (s, i) in enumerate(zip(scores[0], rows[0])) if i >= 0]


def _read_rows(folder: Path) -> tuple[np.ndarray, list, list, list]:
    import pyarrow.parquet as pq

    parts = sorted(done_parts(folder))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no finished embedding parts (run fluxvit-embed first)")
    arrays, keys, paths = [], [], []
    for n in parts:
        emb = np.load(folder / "video_emb" / f"video_emb_{n}.npy")
        table = pq.read_table(folder / "metadata" / f"metadata_{n}.parquet", columns=["key", "path"])
        if table.num_rows != emb.shape[0]:
            raise ValueError(f"part {n} of {folder}: {emb.shape[0]} embeddings but {table.num_rows} metadata rows")
        arrays.append(emb)
        keys += table.column("key").to_pylist()
        paths += table.column("path").to_pylist()
    return np.ascontiguousarray(np.concatenate(arrays), dtype=np.float32), keys, paths, parts


def build_index(folder: Union[str, Path], ivf_above: int = IVF_ABOVE, nprobe: int = 16) -> EmbeddingIndex:
    """Build (and save under ``folder/index/``) the index of every finished part of ``folder``."""
    faiss = _faiss()
    folder = Path(folder)
    x, keys, paths, parts = _read_rows(folder)
    n, d = x.shape
    if n <= ivf_above:
        index, kind = faiss.IndexFlatIP(d), "flat"
        index.add(x)
    else:
        nlist = max(1, int(min(max(16, math.sqrt(n)), n // 39)))  # faiss wants >= 39 training points a list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        train = x[rng.choice(n, size=min(n, 64 * nlist), replace=False)]
        index.train(train)
        index.add(x)
        index.nprobe = min(nprobe, nlist)
        kind = f"ivf{nlist},nprobe{index.nprobe}"
    out = folder / INDEX_DIR
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "knn.index.tmp"
    faiss.write_index(index, str(tmp))
    os.replace(tmp, out / "knn.index")
    (out / "index_info.json").write_text(json.dumps({"rows": n, "dim": d, "kind": kind, "parts": parts}) + "\n")
    log.info("indexed %d rows of dim %d from %d parts of %s (%s)", n, d, len(parts), folder, kind)
    return EmbeddingIndex(index, keys, paths, kind, parts)


def load_index(folder: Union[str, Path], ivf_above: int = IVF_ABOVE) -> EmbeddingIndex:
    """The saved index of ``folder``, rebuilt when absent or when the finished parts changed since."""
    faiss = _faiss()
    folder = Path(folder)
    info_path = folder / INDEX_DIR / "index_info.json"
    if info_path.is_file() and (folder / INDEX_DIR / "knn.index").is_file():
        info = json.loads(info_path.read_text())
        if info.get("parts") == sorted(done_parts(folder)):
            _, keys, paths, parts = _read_rows(folder)
            return EmbeddingIndex(faiss.read_index(str(folder / INDEX_DIR / "knn.index")), keys, paths,
                                  info["kind"], parts)
        log.info("the parts of %s changed since its index was built: rebuilding", folder)
    return build_index(folder, ivf_above)


def embedding_info(folder: Union[str, Path]) -> dict:
    """``embed_info.json`` of an embedding folder (model, vector, setting)."""
    path = Path(folder) / "embed_info.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no embed_info.json: not a fluxvit-embed output folder")
    return json.loads(path.read_text())


def query_encoder(info: dict, model: str = "", arch: str = ""):
    """The encoder that made an embedding folder (``info``), or ``model`` when it has the same weights."""
    source = model or (info["weights_file"] if info.get("stage") == "official" else info["model"])
    enc = load_encoder(source, arch or info.get("arch", ""))
    if enc.model_sha256 != info["model_sha256"]:
        raise ValueError(f"model {source} is not the one that made the embeddings (SHA-256 {enc.model_sha256[:12]} "
                         f"vs {info['model_sha256'][:12]}); its vectors are not comparable")
    return enc.to("cpu")


def embed_query_video(encoder, path: Union[str, Path], info: dict) -> torch.Tensor:
    """(dim,) L2-normalised vector of a video file, decoded and encoded as the folder's videos were."""
    s = EmbedSettings(budget=info["budget"] or None, frames=info["frames"], resolution=info["resolution"],
                      clips=info["clips"], crops=info["crops"], keep_aspect=info.get("keep_aspect", False),
                      decoder=info.get("decoder", "decord"), normalize=info.get("normalize", "imagenet"),
                      patch=encoder.net.config.patch_size)
    path = Path(path)
    ext = path.suffix.lower().lstrip(".") or "mp4"
    try:
        views, _, _ = _decode({"__key__": path.stem, ext: path.read_bytes()}, s)
    except SampleError as err:
        raise ValueError(f"cannot use {path} as a query: {err}") from None
    emb = encoder.embed(views, s.budget)
    return torch.nn.functional.normalize(emb.mean(0), dim=0)


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="fluxvit-search", description="Index and search a fluxvit-embed folder",
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="build DIR/index/ from the embedding parts")
    ix.add_argument("folder")
    ix.add_argument("--ivf-above", type=int, default=IVF_ABOVE, help="rows above which the index is IVF")
    q = sub.add_parser("query", help="top-k keys for a text or a video")
    q.add_argument("folder")
    what = q.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a caption (needs the folder's model to be a stage-2 export)")
    what.add_argument("--video", help="a video file, embedded as the folder's videos were")
    q.add_argument("-k", "--k", type=int, default=10, help="hits to return")
    q.add_argument("--model", default="", help="the model file, when it moved since embedding (same weights)")
    q.add_argument("--arch", default="", help="architecture of an official checkpoint")
    q.add_argument("--json", action="store_true", help="print the hits as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0, or 2 on a usage error)."""
    p = _parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "index":
            idx = build_index(args.folder, args.ivf_above)
            sys.stdout.write(f"indexed {len(idx.keys)} videos of {args.folder} ({idx.kind})\n")
            return 0
        if args.k < 1:
            raise ValueError("-k must be >= 1")
        info = embedding_info(args.folder)
        idx = load_index(args.folder)
        enc = query_encoder(info, args.model, args.arch)
        vec = enc.embed_text([args.text])[0] if args.text is not None else \
            embed_query_video(enc, args.video, info)
        hits = idx.top(vec.numpy(), args.k)
    except (ValueError, FileNotFoundError, ImportError) as err:
        fail(str(err), 2, p.prog)
    if args.json:
        sys.stdout.write(json.dumps({"query": args.text if args.text is not None else args.video, "hits": hits}) + "\n")
    else:
        for h in hits:
            sys.stdout.write(f"{h['rank']:>3}  {h['score']:7.4f}  {h['key']}\n")
    return 0


def cli() -> None:
    """Console-script entry point (``fluxvit-search``)."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
