"""Config values checked at the door: each bad value stops the command with one line naming the key, the value and
what is allowed, exit 2, before the run directory exists; boundary values that are valid pass."""
import json
from pathlib import Path

import pytest

from fluxvit.stages.common.cli import run_cli
from fluxvit.stages.common.validate import RULES, config_problems, warn_conflicts
from fluxvit.stages.distill import build_config as distill_config
from fluxvit.stages.finetune import build_config as finetune_config
from fluxvit.stages.finetune import main as finetune_main
from fluxvit.stages.videotext import build_config as videotext_config

BUILDERS = {"distill": distill_config, "videotext": videotext_config, "finetune": finetune_config}

# (stage, --set, the words the message must hold). The catalogue in docs/ is this table.
INVALID = [
    ("finetune", "data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("finetune", "train.steps=-5", "train.steps=-5: must be an integer >= 0"),
    ("finetune", "train.steps=0", "train.steps=0: must be an integer >= 1 (or set epochs > 0)"),
    ("finetune", "data.decoder=ffmpeg", "data.decoder must be one of ('decord', 'pyav', 'torchcodec'), got 'ffmpeg'"),
    ("finetune", "optim.lr=-0.001", "optim.lr=-0.001: must be a finite number >= 0"),
    ("finetune", "optim.lr=inf", "optim.lr=Infinity: must be a finite number >= 0"),
    ("finetune", "optim.min_lr=-1e-6", "optim.min_lr=-1e-06: must be a finite number >= 0"),
    ("finetune", "optim.clip_grad=-1", "optim.clip_grad=-1"),
    ("finetune", "optim.betas=[0.9,1.0]", "optim.betas=[0.9, 1.0]: must be a non-empty list, each item a finite "
                                          "number >= 0 and < 1"),
    ("finetune", "optim.eps=0", "optim.eps=0.0: must be a finite number > 0"),
    ("finetune", "train.grad_accum=0", "train.grad_accum=0: must be an integer >= 1"),
    ("finetune", "train.ema_decay=1.0", "train.ema_decay=1.0: must be a finite number >= 0 and < 1"),
    ("finetune", "data.num_workers=-1", "data.num_workers and data.shuffle_buffer must be >= 0, got -1 and"),
    ("finetune", "data.reprob=1.5", "data.reprob must be in [0, 1], got 1.5"),
    ("finetune", "data.crop=centre", "data.crop must be 'multiscale' or 'rrc', got 'centre'"),
    ("finetune", "data.crop_scale=[0,1]", "data.crop_scale must satisfy 0 < lo <= hi <= 1, got (0, 1)"),
    ("finetune", "aug.label_smoothing=1.0", "aug.label_smoothing=1.0: must be a finite number >= 0 and < 1"),
    ("finetune", "aug.mixup=-0.1", "aug.mixup=-0.1"),
    ("finetune", "layer_decay=0", "layer_decay=0.0: must be a finite number > 0 and <= 1"),
    ("finetune", "eval.num_clips=0", "eval.num_clips=0: must be an integer >= 1"),
    ("finetune", "loss.budgets=[100000,128,64]", "budgets [100000] exceed the"),
    ("finetune", "train.mixed_precision=fp8", "train.mixed_precision=fp8: must be one of auto, no, bf16, fp16"),
    ("distill", "data.batch_size=0", "data.batch_size must be >= 1, got 0"),
    ("distill", "data.shuffle_buffer=-2", "data.num_workers and data.shuffle_buffer must be >= 0"),
    ("distill", "data.epoch_size=0", "data.epoch_size must be >= 1 or None, got 0"),
    ("distill", "data.grid=nonesuch", "data.grid"),
    ("distill", "data.num_val_clips=-1", "data.num_val_clips=-1: must be an integer >= 0"),
    ("distill", "model.drop_path_rate=1.0", "model.drop_path_rate=1.0"),
    ("videotext", "contrast.budgets=[]", "contrast.budgets=[]: must be a non-empty list"),
    ("videotext", "contrast.temperature=0", "contrast.temperature=0.0: must be a finite number > 0"),
    ("videotext", "optim.warmup_fraction=1.0", "optim.warmup_fraction=1.0: must be a finite number >= 0 and < 1"),
]


def test_every_rule_names_a_field_of_some_stage():
    """A renamed field must not silently leave its rule behind."""
    from fluxvit.stages.common.validate import _ABSENT, _get

    configs = [build("smoke") for build in BUILDERS.values()]
    orphans = [k for k in RULES if all(_get(c, k) is _ABSENT for c in configs)]
    assert orphans == []


def _presets():
    from fluxvit.stages.distill.config import presets as distill
    from fluxvit.stages.finetune.config import presets as finetune
    from fluxvit.stages.videotext.config import presets as videotext

    return [(stage, name) for stage, reg in (("distill", distill), ("videotext", videotext), ("finetune", finetune))
            for name in reg.names()]


@pytest.mark.parametrize("stage,preset", _presets())
def test_every_shipped_preset_is_valid(stage, preset):
    assert config_problems(BUILDERS[stage](preset)) == []


@pytest.mark.parametrize("stage,setting,words", INVALID, ids=[f"{s}:{v}" for s, v, _ in INVALID])
def test_bad_value_is_one_line_naming_key_value_and_allowed(stage, setting, words, capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: BUILDERS[stage]("smoke", [setting]), prog="x")
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("setting", ["data.batch_size=1", "data.num_workers=0", "optim.clip_grad=0.0",
                                     "optim.min_lr=0", "optim.lr=0.0", "optim.warmup_steps=0", "train.ema_decay=0.0",
                                     "data.reprob=0.0", "data.reprob=1.0", "aug.mixup=0.0", "layer_decay=1.0",
                                     "data.shuffle_buffer=0", "train.ckpt_every=0", "eval.budgets=[]",
                                     "eval.budgets=[0]", "data.crop_scale=[1.0,1.0]", "data.epoch_size=null"])
def test_boundary_values_that_are_valid_pass(setting):
    assert config_problems(finetune_config("smoke", [setting])) == []


def test_bad_value_stops_the_run_before_anything_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        run_cli(lambda: finetune_main(["--preset", "smoke", "--set", f"train.run_dir={run}", "--set",
                                       "data.batch_size=0"]), prog="x")
    assert exc.value.code == 2 and not run.exists()
    assert "data.batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_conflicts_are_logged_once_at_start(caplog):
    cfg = finetune_config("smoke", ["train.steps=3", "optim.warmup_steps=5", "data.source=shards",
                                    "data.shards=/x/{0..1}.tar", "data.val_shards=/v/0.tar", "train.eval_every=0",
                                    "eval.budgets=[]"])
    lines = warn_conflicts(cfg, 3, 5)
    assert len(lines) == 2
    assert "warm-up (5 steps) is not shorter than the run (train.steps=3)" in lines[0]
    assert "data.val_shards is set but held-out evaluation is off" in lines[1]
    assert warn_conflicts(finetune_config("smoke", ["train.steps=6", "optim.warmup_steps=5"]), 6, 5) == []
    # stage 3 evaluates the final weights when it has eval budgets: then val_shards are read
    kept = finetune_config("smoke", ["data.val_shards=/v/0.tar", "train.eval_every=0"])
    assert all("val_shards" not in line for line in warn_conflicts(kept, 100, 5))


def write_catalogue(path: Path) -> None:
    """The invalid-value catalogue (docs): stage, --set, the one-line message and the exit status, as run."""
    import contextlib
    import io

    rows = ["| stage | `--set` | message (stderr, one line) | exit |", "|---|---|---|---|"]
    for stage, setting, _ in INVALID:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                run_cli(lambda s=stage, v=setting: BUILDERS[s]("smoke", [v]), prog=f"python -m fluxvit.stages.{stage}")
                code = 0
            except SystemExit as exc:
                code = exc.code
        rows.append(f"| {stage} | `{setting}` | {err.getvalue().strip()} | {code} |")
    path.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    import sys

    write_catalogue(Path(sys.argv[1]))
    print(json.dumps({"rows": len(INVALID)}))
