"""Stage 3 claims on the synthetic motion corpus, read as the paper reads them (measured, not asserted: prints the
figures, writes JSON + Markdown).

Claims, stated as the paper states them:
(a) token selection: at the same budget, the group-dynamic selector is more accurate than random token selection
    (the selector ablation, FluxViT paper, arXiv 2503.14237);
(b) Flux-Multi: at every token budget, the Flux-Multi model is at least as accurate as the Flux-Single model
    (Table 5 compares top-1 budget by budget); judged per budget, with the spread over starts and finetune seeds;
(c) Token Optimization: at a fixed budget, the (frames, resolution) TO picks on val beats the plain unmasked setting
    of the same budget on test.

Protocol (CPU scale; the paper's order: starting checkpoints, then the finetuning recipes compared on each):
1. Starts: the micro FluxViT (finetune preset ``micro_scratch``) trained from scratch on the 8 motion classes with
   every token of 8 x 56 clips. It sits on a loss plateau (CE = ln 8) for a seed-dependent time, so seeds are tried
   two at a time from ``--start-seed``; the first ``--starts`` seeds whose val top-1 reaches twice chance are the
   starts (every try is reported; ``--start-set KEY=VALUE ...`` changes the start recipe, recorded with the
   starts). ``--start PATH ...`` uses existing start exports instead (their sha256 is
   reported, so a rerun elsewhere can check it uses the same weights).
2. For each start and each finetune seed in ``--seeds``: Flux-Multi (budgets 96 / 64 / 32, heads 0 / 1 / 2) and
   Flux-Single (the release's Flux-Single analogue: the middle budget 64 with head 1; ``--single-budget`` /
   ``--single-head``) finetune that start (preset ``micro_multi``) with the same steps and data stream.
3. Test split of the corpus generator (``--videos`` clips), one view of 8 frames x 56 px = 128 tokens: top-1 of
   both models along the budget ladder 128 (all) / 96 / 64 / 48 / 32 / 24 / 16 / 8; (a) the Multi model at 32
   tokens, selector vs uniformly random tokens (3 draws); (c) TO of the Multi model at 64 and 32 tokens.

Reproducibility: every run is one thread with deterministic kernels chosen for portability across x86 CPUs
(``ATEN_CPU_CAPABILITY=default``, ``MKL_CBWR=COMPATIBLE``, ``ONEDNN_MAX_CPU_ISA=SSE41``, ``train.deterministic``).
Two runs on the development machine gave bitwise-equal weights, and the settings change the digits against the
default kernels (so they take effect); other machines were not available to check, so the sha256 of every start's
tensors is reported: equal hashes mean the same start, whatever the machine.

    .venv/bin/python -m benchmarks.finetune_claims                       # find 2 starts, 3 seeds each: hours
    .venv/bin/python -m benchmarks.finetune_claims --shipped-starts --seeds 0 1   # the README's figures, ~2 h
    .venv/bin/python -m benchmarks.finetune_claims --start runs/finetune_claims/start_seed1/model.safetensors
    .venv/bin/python -m benchmarks.finetune_claims --tiny                # the pipeline in about a minute
    # seeds side by side (or on two machines), each with its own --out, then one result:
    .venv/bin/python -m benchmarks.finetune_claims --merge seed0.json seed1.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from benchmarks import write_result

BUDGETS = (96, 64, 32)
LADDER = (0, 96, 64, 48, 32, 24, 16, 8)  # 0 = every token
EVAL_FRAMES, EVAL_RES = 8, 56  # 8 x (56 / 14)^2 = 128 tokens per view; a quarter is 32
CHANCE = 100 / 8
# Kernels that do not depend on the CPU's vector units (ATen, MKL, oneDNN), one thread: the same digits on
# any x86 machine as far as these libraries honour the settings.
DETERMINISTIC_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ATEN_CPU_CAPABILITY": "default",
                     "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "SSE41", "DNNL_MAX_CPU_ISA": "SSE41"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sha256(path: Path) -> str:
    """Hex digest of an export's tensors (names, dtypes, shapes, bytes in name order): the identity of a start
    checkpoint across machines (the file's bytes also hold metadata whose layout may vary)."""
    import torch
    from safetensors.torch import load_file

    h = hashlib.sha256()
    for name, t in sorted(load_file(str(path)).items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


SHIPPED = Path(__file__).parent / "starts"  # the start checkpoints the README's figures came from


def shipped_starts(directory: Path = SHIPPED) -> list[Path]:
    """The start exports recorded in ``directory/starts.json``, each checked against its recorded sha256.

    Raises:
        ValueError: one line when the record or a file is missing, or a file's tensors differ from the record.
    """
    card = Path(directory) / "starts.json"
    if not card.exists():
        raise ValueError(f"no shipped starts: {card} is missing")
    out = []
    for entry in json.loads(card.read_text())["starts"]:
        path = Path(directory) / entry["file"]
        if not path.exists():
            raise ValueError(f"shipped start {path} is missing (recorded in {card})")
        got = sha256(path)
        if got != entry["sha256"]:
            raise ValueError(f"shipped start {path} has sha256 {got[:12]}..., {card} records {entry['sha256'][:12]}...")
        out.append(path)
    return out


def ship_starts(starts: list[Path], tries: list, directory: Path = SHIPPED, recipe: list | None = None) -> Path:
    """Copy the start exports into ``directory`` (``start_seed{N}.safetensors``) and record each one's seed, steps,
    val top-1 and sha256, and the start recipe (``micro_scratch`` plus the ``--start-set`` overrides ``recipe``),
    in ``directory/starts.json``; returns the record's path."""
    import shutil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_name = {f"start_seed{t['seed']}": t for t in tries}
    entries = []
    for path in starts:
        name = path.parent.name  # start_seed{N}
        shutil.copyfile(path, directory / f"{name}.safetensors")
        t = by_name.get(name, {})
        entries.append({"file": f"{name}.safetensors", "sha256": sha256(path), "seed": t.get("seed"),
                        "steps": t.get("steps"), "val_top1": t.get("val_top1")})
    card = directory / "starts.json"
    card.write_text(json.dumps({"preset": "micro_scratch", "overrides": list(recipe or []),
                                "deterministic_env": DETERMINISTIC_ENV,
                                "how": "python -m benchmarks.finetune_claims --ship-starts (step 1 of its protocol)",
                                "starts": entries}, indent=2) + "\n")
    log(f"shipped {len(entries)} starts to {directory}")
    return card


@dataclass
class Run:
    """A stage-3 training process, its run directory and its log file."""

    proc: subprocess.Popen
    run_dir: Path
    logf: IO


def launch(preset: str, run_dir: Path, sets: list[str]) -> Run:
    """Start one single-threaded, deterministic stage-3 run (``python -m fluxvit.stages.finetune``) logging to
    run_dir/train.log."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "fluxvit.stages.finetune", "--preset", preset, "--set", f"train.run_dir={run_dir}",
            "--set", "train.progress=false", "--set", "train.deterministic=true",
            *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, **DETERMINISTIC_ENV}
    logf = open(run_dir / "train.log", "w")
    return Run(subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=env), run_dir, logf)


def wait(runs: dict[str, Run], steps: int, every: float = 60.0) -> None:
    """Wait for every run, logging each one's step (from its metrics.jsonl) about once a minute."""
    last = time.monotonic()
    while any(r.proc.poll() is None for r in runs.values()):
        time.sleep(1)
        if time.monotonic() - last >= every:
            last = time.monotonic()
            log("  " + ", ".join(f"{n} {_steps_done(r.run_dir)}/{steps}" for n, r in runs.items()))
    for name, r in runs.items():
        r.logf.close()
        if r.proc.returncode != 0:
            tail = (r.run_dir / "train.log").read_text().splitlines()[-20:]
            raise RuntimeError(f"run {name} failed (exit {r.proc.returncode}); end of {r.run_dir}/train.log:\n"
                               + "\n".join(tail))


def _steps_done(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return max((r["step"] for r in rows if r.get("kind") == "train"), default=0)


def top1(path: Path, data, split: str, videos: int, budgets=(0,), selection: str = "dynamic", seed: int = 0,
         batches=None) -> dict:
    """Top-1 per budget of an export on ``split`` at 8 x 56 (one view per video)."""
    from fluxvit.stages.finetune.eval import evaluate, load_classifier

    net, heads = load_classifier(str(path))
    rows = evaluate(net, data, split=split, budgets=budgets, frames=EVAL_FRAMES, resolution=EVAL_RES,
                    max_videos=videos, batch_size=50, trained_heads=heads, selection=selection, seed=seed,
                    batches=batches)
    return {r["budget"]: r["top1"] for r in rows}


def find_starts(args, data, run: Path) -> tuple[list[Path], list]:
    """Train starts two seeds at a time until ``args.starts`` leave the plateau; returns their exports and every
    try."""
    tries, good = [], []
    seed = args.start_seed
    while seed < args.start_seed + args.max_start_tries and len(good) < args.starts:
        pair = list(range(seed, min(seed + (1 if args.serial else 2), args.start_seed + args.max_start_tries)))
        log(f"start: micro_scratch from scratch, seeds {pair}, {args.start_steps} steps each")
        t0 = time.perf_counter()
        todo = [s for s in pair if not (run / f"start_seed{s}" / "model.safetensors").exists()]  # rerun: reuse
        runs = {f"seed {s}": launch("micro_scratch", run / f"start_seed{s}",
                                     [f"train.seed={s}", f"train.steps={args.start_steps}", *args.start_set,
                                      *args.extra_start])
                for s in todo}
        wait(runs, args.start_steps)
        secs = time.perf_counter() - t0
        for s in pair:
            path = run / f"start_seed{s}" / "model.safetensors"
            acc = top1(path, data, "val", args.videos)[0]
            tries.append({"seed": s, "val_top1": acc, "steps": args.start_steps, "wall_seconds": round(secs, 1),
                          "sha256": sha256(path)})
            log(f"start seed {s}: val top-1 {acc:.1f} (chance {CHANCE:.1f})")
            if acc >= args.start_threshold * CHANCE and len(good) < args.starts:
                good.append(path)
        seed += len(pair)
    if not good:
        raise RuntimeError(f"no start left the plateau in {args.max_start_tries} seeds: {tries}")
    if args.all_starts and len(good) < args.starts:
        raise RuntimeError(f"the start recipe fails: {len(good)} of {args.starts} starts reached "
                           f"{args.start_threshold * CHANCE:.1f} % in {args.max_start_tries} seeds: {tries}")
    return good, tries


def measure(ckpts: dict, data, args, test, out_dir: Path, plot: bool) -> dict:
    """The budget ladder of both models, (a) and (c) for one (start, finetune seed)."""
    from fluxvit.stages.finetune.eval import load_classifier
    from fluxvit.stages.finetune.tokenopt import plot_tokenopt, token_optimize, write_table

    res = {"ladder": {m: {str(k): v for k, v in top1(p, data, "test", args.videos, LADDER, batches=test).items()}
                      for m, p in ckpts.items()}}
    quarter = EVAL_FRAMES * (EVAL_RES // 14) ** 2 // 4
    rand = [top1(ckpts["multi"], data, "test", args.videos, (quarter,), "random", s, test)[quarter] for s in (0, 1, 2)]
    res["a"] = {"budget": quarter, "dynamic": res["ladder"]["multi"][str(quarter)], "random_draws": rand,
                "random": statistics.mean(rand)}
    if not args.tokenopt:  # (c) not measured: the ladder and (a) only
        res["c"] = {}
        return res
    net, heads = load_classifier(str(ckpts["multi"]))
    to = token_optimize(net, data, [64, 32], frames=args.to_frames, resolutions=[42, 56, 70],
                        base_resolution=EVAL_RES, split="val", report_split="test", max_videos=args.videos,
                        batch_size=50, trained_heads=heads)
    if plot:
        write_table(to, out_dir)
        plot_tokenopt(to, out_dir / "tokenopt.png", title="micro FluxViT (Flux-Multi), synthetic motion")
    res["c"] = {str(r["budget"]): {"plain": [r["plain"]["frames"], r["plain"]["resolution"], r["plain"]["top1"]],
                                   "to": [r["to"]["frames"], r["to"]["resolution"], r["to"]["top1"]],
                                   "gain": r["gain"]} for r in to["rows"]}
    return res


def _stats(xs: list) -> dict:
    """mean, sample std (0 for one value), min, max, n of a list of accuracies (rounded to 0.01)."""
    r = lambda x: round(x, 2)  # noqa: E731
    return {"mean": r(statistics.mean(xs)), "std": r(statistics.stdev(xs)) if len(xs) > 1 else 0.0,
            "min": r(min(xs)), "max": r(max(xs)), "n": len(xs)}


def _level(diffs: list) -> bool:
    """Whether a mean difference is within 2 standard errors of 0 (needs two runs or more; False for one run)."""
    return len(diffs) > 1 and abs(statistics.mean(diffs)) <= 2 * statistics.stdev(diffs) / math.sqrt(len(diffs))


def summarize(runs: list) -> dict:
    """Per-budget statistics over every (start, finetune seed) run and each claim's verdict, as the paper reads it.

    (b) holds at budget K when Flux-Multi's mean top-1 is at least Flux-Single's; ``ahead`` counts the runs where
    Multi is strictly better. (a) / (c) compare means. ``robust`` says whether every run agrees with the verdict;
    ``level`` whether the mean difference is within 2 standard errors of 0 over the runs (then the runs cannot
    order the two, whichever way the mean leans).
    """
    ladder = {}
    for k in (str(k) for k in LADDER):
        multi = [r["ladder"]["multi"][k] for r in runs]
        single = [r["ladder"]["single"][k] for r in runs]
        diff = [m - s for m, s in zip(multi, single)]
        ladder[k] = {"multi": _stats(multi), "single": _stats(single), "diff": _stats(diff),
                     "ahead": sum(d > 0 for d in diff), "holds": statistics.mean(diff) >= 0,
                     "robust": all(d >= 0 for d in diff), "level": _level(diff)}
    a_diff = [r["a"]["dynamic"] - r["a"]["random"] for r in runs]
    c = {}
    for K in runs[0]["c"]:
        gains = [r["c"][K]["gain"] for r in runs]
        c[K] = {"plain": _stats([r["c"][K]["plain"][2] for r in runs]), "to": _stats([r["c"][K]["to"][2] for r in runs]),
                "gain": _stats(gains), "holds": statistics.mean(gains) > 0, "robust": all(g > 0 for g in gains),
                "level": _level(gains)}
    trained = [str(k) for k in BUDGETS]
    return {"ladder": ladder,
            "a": {"dynamic": _stats([r["a"]["dynamic"] for r in runs]), "random": _stats([r["a"]["random"] for r in runs]),
                  "diff": _stats(a_diff), "holds": statistics.mean(a_diff) > 0, "robust": all(d > 0 for d in a_diff),
                  "level": _level(a_diff)},
            "b": {"trained_budgets_held": [k for k in trained if ladder[k]["holds"]],
                  "ladder_held": [k for k in ladder if ladder[k]["holds"]],
                  "holds": all(ladder[k]["holds"] for k in trained)},
            "c": c}


def _verdict(entry: dict) -> str:
    """A summary entry's verdict: level within 2 standard errors, else holds / does not hold (and whether every run
    agrees)."""
    if entry.get("level"):
        return "level (within 2 SE)"
    return ("holds" if entry["holds"] else "does not hold") + ("" if entry["robust"] == entry["holds"] else
                                                                 " (not in every run)")


def _cell(st: dict) -> str:
    return f"{st['mean']:.1f} ± {st['std']:.1f} [{st['min']:.1f}, {st['max']:.1f}]"


def markdown(res: dict) -> str:
    """The README tables of one run: claims as the paper states them, per budget as Table 5."""
    s = res["summary"]
    label = lambda p: p.parent.name if p.name == "model.safetensors" else p.name  # noqa: E731
    starts = "; ".join(f"`{label(Path(st['path']))}` (sha256 {st['sha256'][:12]})" for st in res["starts"])
    tries = "; ".join(f"seed {t['seed']}: val {t['val_top1']:.1f}" for t in res["start_tries"])
    n = len(res["runs"])
    lines = [f"Starts: {starts}" + (f" (tries: {tries})" if tries else "") + f". Finetune seeds "
             f"{', '.join(map(str, res['seeds']))}, {res['steps']} steps each: {n} runs per recipe. Flux-Single at "
             f"{res['single'][0]} tokens, head {res['single'][1]}. Test split, {res['videos']} videos, one view of 8 x "
             f"56 px (128 tokens), chance {CHANCE:.1f}. Cells: mean ± sample std [min, max] over the {n} runs.", "",
             "(b) top-1 per budget (as Table 5); trained budgets 96 / 64 / 32, 0 = all 128 tokens:", "",
             "| tokens | Flux-Multi | Flux-Single | Multi - Single | Multi ahead | claim |", "|---|---|---|---|---|---|"]
    for k, row in s["ladder"].items():
        lines.append(f"| {k if k != '0' else '128 (all)'} | {_cell(row['multi'])} | {_cell(row['single'])} | "
                     f"{_cell(row['diff'])} | {row['ahead']}/{n} | {_verdict(row)} |")
    a = s["a"]
    lines += ["", f"(a) at 32 of 128 tokens, group-dynamic {_cell(a['dynamic'])} vs random {_cell(a['random'])} "
              f"(3 draws per run): {_verdict(a)}.", ""]
    if not s["c"]:
        lines.append("(c) Token Optimization: not measured in this run (`--no-tokenopt`).")
    else:
        lines += ["(c) Token Optimization on the Multi model (searched on val, reported on test):", "",
                  "| budget | plain | TO | gain | claim |", "|---|---|---|---|---|"]
        lines += [f"| {K} | {_cell(v['plain'])} | {_cell(v['to'])} | {_cell(v['gain'])} | {_verdict(v)} |"
                  for K, v in s["c"].items()]
    lines += ["", "(b) at the trained budgets: " + "; ".join(f"{k}: {_verdict(s['ladder'][str(k)])}" for k in BUDGETS)
              + f". Mean of Multi at least Single's along the ladder at: {', '.join(s['b']['ladder_held']) or 'none'}."]
    return "\n".join(lines) + "\n"


PROTOCOL_KEYS = ("steps", "budgets", "single", "videos", "eval_input", "deterministic_env", "tiny")


def merge(parts: list[dict]) -> dict:
    """One result from partial runs of the same protocol (e.g. ``--seeds 0`` and ``--seeds 1`` run side by side).

    Every part must finetune the same starts (by sha256) under the same protocol (steps, budgets, Flux-Single,
    clips, eval input, kernels) and either all measure (c) or none; a (start, seed) pair may appear once only.
    Returns the combined result without its summary (``_write`` adds it).
    """
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    hashes = [st["sha256"] for st in first["starts"]]
    for i, part in enumerate(parts[1:], 1):
        if [st["sha256"] for st in part["starts"]] != hashes:
            raise ValueError(f"part {i} finetunes other starts than part 0: cannot merge")
        for key in PROTOCOL_KEYS:
            if part.get(key) != first.get(key):
                raise ValueError(f"part {i} differs from part 0 in {key!r} ({part.get(key)!r} vs "
                                 f"{first.get(key)!r}): not the same protocol")
    runs, seen = [], set()
    for part in parts:
        for r in part["runs"]:
            if (r["start"], r["seed"]) in seen:
                raise ValueError(f"start {r['start']} seed {r['seed']} appears in two parts")
            seen.add((r["start"], r["seed"]))
            runs.append(r)
    if len({bool(r["c"]) for r in runs}) > 1:
        raise ValueError("some parts measured claim (c) and others did not (--no-tokenopt): cannot merge")
    runs.sort(key=lambda r: (r["seed"], r["start"]))
    seeds = sorted({s for part in parts for s in part["seeds"]})
    out = {k: v for k, v in first.items() if k not in ("runs", "summary", "seconds", "complete")}
    out.update(seeds=seeds, runs=runs, merged_from=len(parts),
               part_seconds=[part.get("seconds") for part in parts])
    return out


def _write(res: dict, out: str, seconds: float) -> str:
    """Summarise the runs so far and write the JSON and Markdown results (complete when every start has every
    seed); returns the Markdown."""
    res["summary"] = summarize(res["runs"])
    res["seconds"] = round(seconds, 1)
    res["complete"] = len(res["runs"]) == len(res["starts"]) * len(res["seeds"])
    md = markdown(res)
    if not res["complete"]:
        md = f"(partial: {len(res['runs'])} runs so far)\n\n" + md
    write_result(out, res)
    Path(out).with_suffix(".md").write_text(md)
    return md


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="finetune seeds (data stream, mixing)")
    p.add_argument("--steps", type=int, default=1500, help="finetune steps of each recipe")
    p.add_argument("--start", nargs="+", default=[], help="existing start exports (skip step 1)")
    p.add_argument("--shipped-starts", action="store_true",
                   help="finetune the starts the README's figures came from (benchmarks/starts, sha256 checked)")
    p.add_argument("--ship-starts", action="store_true", help="copy the starts found in step 1 to benchmarks/starts")
    p.add_argument("--starts", type=int, default=2, help="starts to find (step 1)")
    p.add_argument("--start-seed", type=int, default=0)
    p.add_argument("--start-steps", type=int, default=3000)
    p.add_argument("--start-threshold", type=float, default=2.0, help="a start must reach this x chance on val")
    p.add_argument("--start-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides of the start recipe (micro_scratch), e.g. optim.warmup_steps=300; recorded")
    p.add_argument("--max-start-tries", type=int, default=8)
    p.add_argument("--all-starts", action="store_true",
                   help="stop unless --starts starts pass within --max-start-tries seeds (the 3-of-3 bar)")
    p.add_argument("--single-budget", type=int, default=64, help="Flux-Single budget (release: 2048 of 3072/2048/1024)")
    p.add_argument("--single-head", type=int, default=1)
    p.add_argument("--videos", type=int, default=400, help="clips of the val (TO search, start check) and test splits")
    p.add_argument("--tiny", action="store_true", help="a pipeline check: a few steps, 16 videos, 1 start, 1 seed")
    p.add_argument("--serial", action="store_true", help="one training process at a time (default: two)")
    p.add_argument("--no-tokenopt", dest="tokenopt", action="store_false",
                   help="skip claim (c) (Token Optimization's search: 36 settings x the val clips, the slowest "
                        "measurement); the ladder, (a) and (b) as always")
    p.add_argument("--run-dir", default="runs/finetune_claims")
    p.add_argument("--out", default="benchmarks/results/finetune_claims.json")
    p.add_argument("--merge", nargs="+", default=[], metavar="JSON",
                   help="combine the results of partial runs of one protocol (e.g. --seeds 0 and --seeds 1 run side "
                        "by side with their own --out) into --out; trains and measures nothing")
    args = p.parse_args(argv)
    if args.merge:
        res = merge([json.loads(Path(x).read_text()) for x in args.merge])
        md = _write(res, args.out, max(x or 0 for x in res["part_seconds"]))  # the parts ran side by side
        print(md)
        return res
    args.extra_start, args.extra_finetune, args.to_frames = [], [], [2, 4, 6, 8, 12, 16]
    if args.tiny:
        args.steps, args.start_steps, args.videos, args.starts, args.start_threshold = 4, 4, 16, 1, 0.0
        args.seeds = args.seeds[:1]
        args.to_frames = [2, 4, 8]
        args.extra_start = ["train.log_every=2", "eval.max_videos=8", "data.batch_size=4"]
        args.extra_finetune = ["train.log_every=2", "eval.budgets=[]", "data.batch_size=4", "optim.warmup_steps=1"]
    import torch

    from fluxvit.stages.finetune import build_config
    from fluxvit.stages.finetune.data import eval_views

    torch.set_num_threads(1 if args.serial else min(2, os.cpu_count() or 1))
    t_start = time.perf_counter()
    run = Path(args.run_dir)
    data = build_config("micro_multi").data
    if args.shipped_starts:
        starts, tries = shipped_starts(), []
    elif args.start:
        starts, tries = [Path(x) for x in args.start], []
    else:
        starts, tries = find_starts(args, data, run)
        if args.ship_starts:
            ship_starts(starts, tries, recipe=args.start_set)
    hashes = {x: sha256(x) for x in starts}
    res = {"starts": [{"path": str(x), "sha256": hashes[x]} for x in starts], "start_tries": tries,
           "start_steps": args.start_steps if tries else None, "start_set": args.start_set if tries else None,
           "seeds": args.seeds, "steps": args.steps,
           "budgets": list(BUDGETS), "single": [args.single_budget, args.single_head], "videos": args.videos,
           "eval_input": [EVAL_FRAMES, EVAL_RES], "deterministic_env": DETERMINISTIC_ENV, "tiny": args.tiny,
           "runs": []}
    log("starts: " + ", ".join(f"{x} ({hashes[x][:12]})" for x in starts))
    test = list(eval_views(data, "test", EVAL_FRAMES, EVAL_RES, 1, 1, args.videos, 50))  # rendered once
    # seed-major order: a run cut short still has every start at its first seeds
    for seed in args.seeds:
        for si, start in enumerate(starts):
            log(f"start {si}, finetune seed {seed}: Flux-Multi and Flux-Single side by side, {args.steps} steps")
            t0 = time.perf_counter()
            base = run / f"start{si}_seed{seed}"
            dirs = {m: base / m for m in ("multi", "single")}
            common = [f"train.seed={seed}", f"train.steps={args.steps}", f"model.init={start}",
                      f"loss.single_budget={args.single_budget}", f"loss.single_head={args.single_head}",
                      *args.extra_finetune]
            exports = {m: d / "model.safetensors" for m, d in dirs.items()}
            if all(x.exists() for x in exports.values()):  # a rerun of an interrupted experiment
                log(f"  reusing the finished exports in {base}")
            elif args.serial:  # one process at a time (one core)
                for m, d in dirs.items():
                    wait({m: launch("micro_multi", d, [f"loss.mode={m}", *common])}, args.steps)
            else:
                runs = {m: launch("micro_multi", d, [f"loss.mode={m}", *common]) for m, d in dirs.items()}
                wait(runs, args.steps)
            secs = time.perf_counter() - t0
            row = measure(exports, data, args, test, base / "tokenopt", plot=not args.tiny)
            row.update(start=si, seed=seed, train_wall_seconds=round(secs, 1))
            res["runs"].append(row)
            log(f"start {si} seed {seed}: Multi " + " / ".join(f"{row['ladder']['multi'][str(k)]:.1f}" for k in BUDGETS)
                + ", Single " + " / ".join(f"{row['ladder']['single'][str(k)]:.1f}" for k in BUDGETS))
            md = _write(res, args.out, time.perf_counter() - t_start)  # after every run: an interrupted run keeps its rows
    print(md)
    log(f"total {res['seconds'] / 60:.1f} min")
    return res


if __name__ == "__main__":
    main()
