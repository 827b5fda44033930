"""RECIPES.md is the machine-readable recipe card: every paper / release preset, field by field, against its
documented value, with a source for every row."""
import json
import re
from pathlib import Path

import pytest

from fluxvit.stages.common.config import config_to_dict
from fluxvit.stages.distill.config import presets as distill_presets
from fluxvit.stages.finetune.config import presets as finetune_presets
from fluxvit.stages.videotext.config import presets as videotext_presets

CARD = Path(__file__).resolve().parents[1] / "RECIPES.md"
REGISTRIES = {"Stage 3": finetune_presets, "Stage 2": videotext_presets, "Stage 1": distill_presets}
# Presets that are not paper / release recipes (CPU-scale demos and experiments).
NOT_RECIPES = {"smoke", "smoke_corpus", "demo", "micro_scratch", "micro_multi"}
# Run plumbing, not hyperparameters: where and how often to write, where the data lives, how it is decoded.
PLUMBING = ("train.run_dir", "train.log_every", "train.ckpt_every", "train.keep_last", "train.resume",
            "train.max_bad_steps", "train.eval_every", "train.export_name",
            "train.tensorboard",
            "train.find_unused_parameters", "train.deterministic", "train.progress", "train.seed",
            "data.source", "data.shards", "data.val_shards", "data.root", "data.num_clips", "data.num_val_clips",
            "data.decoder", "data.decoder_threads", "data.num_workers", "data.epoch_size", "data.shuffle_buffer",
            "data.pin_memory", "data.prefetch_factor", "data.resampled", "data.num_frames", "data.img_size",
            "eval.split", "eval.max_videos", "eval.batch_size", "retrieval.max_videos", "align.teacher.")
# The in-memory synthetic sources' own knob (refused with shards, which every recipe reads).
PLUMBING += ("data.motion_curriculum",)
# Speed / memory switches that leave the math unchanged (compiled and checkpointed steps equal eager ones).
PLUMBING += ("train.compile", "train.grad_checkpointing")
SOURCE = re.compile(r"Table \d+|release (script|code|factory|eval|Flux-Single)|InternVideo2|UMT|\[inferred\]|"
                    r"\[choice\]|\[derived\]")


def _leaves(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_card(text: str) -> dict:
    """{(stage, preset): {field: (value, source)}} from the card's tables."""
    out: dict = {}
    stage, names = None, None
    for line in text.splitlines():
        if line.startswith("### "):
            stage = next((s for s in REGISTRIES if line[4:].startswith(s)), None)
            names = None
        elif line.startswith("| field |"):
            names = [c.strip("`") for c in _cells(line)[1:-1]]
        elif names and line.startswith("| `"):
            cells = _cells(line)
            field, values, source = cells[0].strip("`"), cells[1:-1], cells[-1]
            assert len(values) == len(names), f"row {field}: {len(values)} values for {len(names)} presets"
            for name, value in zip(names, values):
                out.setdefault((stage, name), {})[field] = (json.loads(value.strip("`")), source)
        elif not line.startswith("|"):
            names = None
    return out


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == pytest.approx(b, rel=1e-9)
    return a == b


CARD_ROWS = parse_card(CARD.read_text())


def test_every_paper_and_release_preset_is_on_the_card():
    for stage, registry in REGISTRIES.items():
        recipes = set(registry.names()) - NOT_RECIPES
        on_card = {name for s, name in CARD_ROWS if s == stage}
        assert recipes == on_card, f"{stage}: presets without a card {recipes - on_card}, stale {on_card - recipes}"


@pytest.mark.parametrize("stage,name", sorted(CARD_ROWS))
def test_preset_matches_its_card_field_by_field(stage, name):
    card = CARD_ROWS[(stage, name)]
    config = {k: v for k, v in _leaves(config_to_dict(REGISTRIES[stage].get(name))) if not k.startswith(PLUMBING)}
    assert set(card) == set(config), f"fields missing from the card {set(config) - set(card)}, " \
                                     f"not in the preset {set(card) - set(config)}"
    for field, (value, source) in card.items():
        assert _same(config[field], value), f"{name}.{field}: preset {config[field]!r}, card {value!r}"
        assert SOURCE.search(source), f"{name}.{field}: source {source!r} cites nothing"


def test_the_card_parser_catches_a_drift():
    text = CARD.read_text().replace("| `optim.weight_decay` | `0.05` |", "| `optim.weight_decay` | `0.5` |", 1)
    drifted = parse_card(text)[("Stage 3", "k710_small")]["optim.weight_decay"][0]
    assert drifted == 0.5 and not _same(finetune_presets.get("k710_small").optim.weight_decay, drifted)
