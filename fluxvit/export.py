"""Export a trained encoder for serving: ``torch.export`` at a fixed grid, batch and token budget.

    python -m fluxvit.export --model runs/videotext/videotext.safetensors --frames 8 --resolution 224 \\
        --budget 1024 --batch-size 4 --out encoder.pt2

The exported program takes a normalised batch (B, 3, T, R, R) and returns (B, dim) L2-normalised vectors, the
same vector ``fluxvit-embed`` writes for the model (``fluxvit.encoders``): the group-dynamic token selector, the
packing of the B clips into one sequence, the blocks and the pooling head are all inside the graph. Everything
that depends on the input's shape (kept-token counts, sequence lengths, the head) is fixed when exporting, so the
program serves exactly that (B, T, R, K); export one program per setting you serve. Load it with
``torch.export.load(path).module()`` (no fluxvit import needed to run it).

ONNX (``--onnx FILE``, extra ``fluxvit[onnx]``): PyTorch's ONNX exporter (dynamo) has no translation of the
packed path's ``repeat_interleave`` (the segment id of every packed token) with a fixed ``output_size``; it is
rewritten before the conversion as a cumulative sum and a comparison (``_REPEAT_INTERLEAVE``), after which the
whole graph, selector (top-k) included, converts and ONNX Runtime matches eager within 1e-5.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .encoders import Encoder, load_encoder
from .stages.common.cli import OneLineParser, fail, token_budget_or_all

__all__ = ["FixedBudgetEncoder", "export_encoder", "export_onnx", "main"]

log = logging.getLogger("fluxvit.export")


class FixedBudgetEncoder(nn.Module):
    """``Encoder.embed`` for one token budget as an ``nn.Module``: (B, 3, T, H, W) -> (B, dim) L2-normalised.

    Stage-2 models give the joint video-text embedding; every other model its pooled feature from the head that
    ``fluxvit-embed`` would use for this budget. ``budget`` None keeps every token."""

    def __init__(self, encoder: Encoder, budget: Union[int, None], tokens: int):
        super().__init__()
        self.net = encoder.net
        self.videotext = encoder.videotext
        self.budget = budget
        self.head = encoder.head_for(tokens if budget is None else min(budget, tokens))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if self.videotext is not None:
            return self.videotext.encode_video(video, num_tokens=self.budget)
        feats = self.net.forward_features(video, num_tokens=self.budget, head=self.head)
        return F.normalize(feats.pooled, dim=-1)


def export_encoder(encoder: Encoder, frames: int, resolution: int, budget: Union[int, None],
                   batch_size: int = 1) -> torch.export.ExportedProgram:
    """``torch.export`` of ``FixedBudgetEncoder`` for inputs of shape (batch_size, 3, frames, resolution,
    resolution) (float32 on the encoder's device)."""
    p = encoder.net.config.patch_size
    if resolution % p:
        raise ValueError(f"--resolution must be a multiple of the patch size {p}, got {resolution}")
    module = FixedBudgetEncoder(encoder, budget, frames * (resolution // p) ** 2).eval()
    param = next(encoder.net.parameters())
    example = torch.randn(batch_size, 3, frames, resolution, resolution, device=param.device, dtype=param.dtype)
    with torch.no_grad():
        return torch.export.export(module, (example,), strict=False)


def _segment_ids(repeats: torch.Tensor, output_size=None) -> torch.Tensor:
    """``repeat_interleave(arange(S), repeats)`` without ``repeat_interleave``: token j's segment is the number of
    cumulative lengths <= j. ``output_size`` (the packed length) is fixed in an exported program."""
    if output_size is None:
        raise ValueError("repeat_interleave without output_size cannot be rewritten for ONNX")
    ends = torch.cumsum(repeats, 0)
    j = torch.arange(output_size, device=repeats.device)
    return (ends[None, :] <= j[:, None]).sum(1)


def _gather_repeated(x: torch.Tensor, repeats: torch.Tensor, dim=None, output_size=None) -> torch.Tensor:
    if x.dim() != 1 or dim not in (None, 0):
        raise ValueError("only 1-D repeat_interleave is rewritten for ONNX")
    return x[_segment_ids(repeats, output_size)]


_REPEAT_INTERLEAVE = {torch.ops.aten.repeat_interleave.Tensor: _segment_ids,
                      torch.ops.aten.repeat_interleave.self_Tensor: _gather_repeated}


def export_onnx(program: torch.export.ExportedProgram, path: Union[str, Path]) -> Path:
    """Convert an ``export_encoder`` program to ONNX at ``path`` (needs onnx + onnxscript: ``pip install
    'fluxvit[onnx]'``)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter's backend)
    except ImportError:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'fluxvit[onnx]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program = torch.onnx.export(program.run_decompositions(_REPEAT_INTERLEAVE), dynamo=True, verbose=False)
    onnx_program.save(str(path))
    return path


def main(argv: Sequence[str] | None = None) -> Path:
    """CLI: write the exported program (``torch.export.save``) and report its largest difference to eager."""
    p = OneLineParser(prog="python -m fluxvit.export", description="torch.export a FluxViT at a fixed setting",
                      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="as fluxvit-embed's --model")
    p.add_argument("--arch", default="")
    p.add_argument("--weights", default="")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--budget", type=token_budget_or_all, default=2048, help="token budget ('all': every token)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", required=True, help="output .pt2 file")
    p.add_argument("--onnx", default="", help="also write an ONNX model here (needs fluxvit[onnx])")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        enc = load_encoder(args.model, args.arch, args.weights)
        program = export_encoder(enc, args.frames, args.resolution, args.budget or None, args.batch_size)
        if args.onnx:
            export_onnx(program, args.onnx)
    except (ValueError, FileNotFoundError, ImportError) as err:
        fail(str(err), 2, p.prog)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out))
    x = torch.randn(args.batch_size, 3, args.frames, args.resolution, args.resolution)
    with torch.no_grad():
        diff = (program.module()(x) - enc.embed(list(x), args.budget or None)).abs().max().item()
    sys.stdout.write(f"wrote {out}: input ({args.batch_size}, 3, {args.frames}, {args.resolution}, "
                     f"{args.resolution}), budget {args.budget or 'all'}; max |exported - eager| = {diff:.2e}"
                     f"{f'; ONNX: {args.onnx}' if args.onnx else ''}\n")
    return out


if __name__ == "__main__":
    main()
