"""Is the synthetic motion's direction, sign included, readable from the stage-3 claims' inputs? (measured: prints the
figures, writes JSON)

A hand-made estimator with no learning reads each clip: foreground = |frame - the clip's temporal median| summed
over channels, the foreground's centroid on the torus per frame (circular mean of the columns and of the rows), the
wrapped frame-to-frame displacement summed over the clip; the axis with the larger total displacement and its sign
give the direction (left / right / up / down). Run on the training input of ``micro_scratch`` (after its training
transform) and on the evaluation views of the claims (one view, 8 x 56 px), it tells whether a model's failure to
separate left from right (or up from down) is missing information or optimisation.

    .venv/bin/python -m benchmarks.motion_sign                 # 400 training clips, 400 test views: ~1 min
"""
from __future__ import annotations

import argparse
import math

import torch

from benchmarks import write_result


def direction(clip: torch.Tensor) -> int:
    """The estimator's direction of one clip (3, T, R, R): 0 left, 1 right, 2 up, 3 down (the corpus's order)."""
    x = clip.float()
    fg = (x - x.median(dim=1, keepdim=True).values).abs().sum(0)  # (T, R, R)
    R = fg.shape[-1]
    phase = torch.exp(1j * torch.arange(R) * 2 * math.pi / R)
    cx = (fg.sum(1) * phase).sum(-1)  # (T,) column centroid as a unit-circle phase
    cy = (fg.sum(2) * phase).sum(-1)
    dx, dy = (torch.angle(c[1:] / c[:-1]).sum().item() for c in (cx, cy))  # wrapped steps, summed
    if abs(dx) >= abs(dy):
        return 0 if dx < 0 else 1
    return 2 if dy < 0 else 3


def score(clips_and_labels) -> dict:
    """Share (%) of clips whose direction (axis and sign) and whose axis alone the estimator gets right."""
    n = sign = axis = 0
    for clip, label in clips_and_labels:
        d, want = direction(clip), label // 2  # labels: direction x speed, speed fastest
        n, sign, axis = n + 1, sign + (d == want), axis + (d // 2 == want // 2)
    return {"clips": n, "direction": round(100 * sign / n, 1), "axis": round(100 * axis / n, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=400, help="training clips and test views")
    p.add_argument("--out", default="benchmarks/results/motion_sign.json")
    args = p.parse_args(argv)
    from fluxvit.stages.finetune import build_config
    from fluxvit.stages.finetune.data import build_train_source, eval_views

    data = build_config("micro_scratch").data
    source = build_train_source(data, 0, 0, 1)
    train = []
    for b in range(math.ceil(args.clips / data.batch_size)):
        batch = source.batch(b)
        train += list(zip(batch["video"], batch["label"].tolist()))
    test = [(v, y) for b in eval_views(data, "test", 8, 56, 1, 1, args.clips, 50)
            for v, y in zip(b["video"], b["label"].tolist())]
    res = {"train_input": score(train[:args.clips]), "test_views": score(test), "chance_direction": 25.0}
    print(f"training input ({res['train_input']['clips']} clips, micro_scratch's transform): direction "
          f"{res['train_input']['direction']} %, axis {res['train_input']['axis']} %")
    print(f"test views ({res['test_views']['clips']}, 8 x 56 px): direction {res['test_views']['direction']} %, "
          f"axis {res['test_views']['axis']} % (chance: direction 25 %, axis 50 %)")
    write_result(args.out, res)
    return res


if __name__ == "__main__":
    main()
