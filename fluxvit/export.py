"""Export a trained encoder for serving: ``torch.export`` at a fixed grid, batch and token budget.

    python -m fluxvit.export --model runs/videotext/videotext.safetensors --frames 8 --resolution 224 \\
        --budget 1024 --batch-size 4 --out encoder.pt2

The exported program takes a normalised batch (B, 3, T, R, R) and returns (B, dim) L2-normalised vectors, the
same vector ``fluxvit-embed`` writes for the model (``fluxvit.encoders``): the group-dynamic token selector, the
packing of the B clips into one sequence, the blocks and the pooling head are all inside the graph. Everything
that depends on the input's shape (kept-token counts, sequence lengths, the head) is fixed when exporting, so the
program serves exactly that (B, T, R, K); export one program per setting you serve. Load it with
``torch.export.load(path).module()`` (no fluxvit import needed to run it).
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

__all__ = ["FixedBudgetEncoder", "export_encoder", "main"]

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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        enc = load_encoder(args.model, args.arch, args.weights)
        program = export_encoder(enc, args.frames, args.resolution, args.budget or None, args.batch_size)
    except (ValueError, FileNotFoundError) as err:
        fail(str(err), 2, p.prog)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(out))
    x = torch.randn(args.batch_size, 3, args.frames, args.resolution, args.resolution)
    with torch.no_grad():
        diff = (program.module()(x) - enc.embed(list(x), args.budget or None)).abs().max().item()
    sys.stdout.write(f"wrote {out}: input ({args.batch_size}, 3, {args.frames}, {args.resolution}, "
                     f"{args.resolution}), budget {args.budget or 'all'}; max |exported - eager| = {diff:.2e}\n")
    return out


if __name__ == "__main__":
    main()
