"""What a person sees at the command line: one-line errors with exit status 2, budgets below 1 refused, the launch
check, log lines printed once, a progress postfix of the step shown, and the Makefile's handling of arguments."""
import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fluxvit.stages.common.cli import run_cli
from fluxvit.stages.common.runtime import (DistributedMismatchError, MetricLogger, check_distributed,
                                           expected_distributed_types)

ROOT = Path(__file__).resolve().parents[1]


def _one_line_exit(capsys, fn, status=2):
    with pytest.raises(SystemExit) as exc:
        fn()
    assert exc.value.code == status
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err  # one line, no traceback, no usage dump
    return lines[0]


@pytest.mark.parametrize("override,needle", [
    ("optim.lr=abc", "optim.lr: cannot read 'abc' as a float"),
    ("optim.lrr=1", "optim.lrr: unknown field 'lrr' in optim"),
    ("nosuch.x=1", "nosuch.x: unknown config section 'nosuch'"),
    ("train.steps=1.5", "train.steps: cannot read '1.5' as an integer"),
    ("train.progress=maybe", "train.progress: cannot read 'maybe' as a boolean"),
    ("optim=1", "optim: is a config section"),
])
def test_config_errors_exit_2_with_one_line_naming_the_key(capsys, override, needle):
    from fluxvit.stages.finetune import main

    line = _one_line_exit(capsys, lambda: run_cli(lambda: main(["--preset", "smoke", "--set", override])))
    assert needle in line


def test_unknown_preset_is_one_line(capsys):
    from fluxvit.stages.distill import main

    line = _one_line_exit(capsys, lambda: run_cli(lambda: main(["--preset", "nope"])))
    assert "invalid choice: 'nope'" in line


@pytest.mark.parametrize("module,argv,needle", [
    ("fluxvit.stages.finetune.eval", ["x", "--set", "eval.budgets=[-5]"], "eval.budgets"),
    ("fluxvit.stages.finetune.eval", ["x", "--set", "eval.budgets=[1.5]"], "eval.budgets"),
    ("fluxvit.stages.finetune.tokenopt", ["x", "--set", "tokenopt.budgets=[0]"], "tokenopt.budgets"),
    ("fluxvit.stages.videotext.retrieval", ["--set", "retrieval.budgets=[64,0]"], "retrieval.budgets"),
    ("fluxvit.stages.finetune.tokenopt", ["x", "--set", "tokenopt.nope=1"], "tokenopt.nope: unknown field"),
    ("fluxvit.stages.videotext.retrieval", ["--set", "data.decoder=nope"], "data.decoder must be one of"),
])
def test_evaluation_tools_take_the_stages_set_vocabulary_and_refuse_bad_values(capsys, module, argv, needle):
    import importlib

    main = importlib.import_module(module).main
    line = _one_line_exit(capsys, lambda: main(argv))
    assert needle in line


def test_budget_types_accept_positive_integers_and_all_only_where_allowed():
    import argparse

    from fluxvit.stages.common.cli import token_budget, token_budget_or_all

    assert token_budget_or_all("all") == 0 and token_budget_or_all("64") == 64 and token_budget("1") == 1
    for bad in ("0", "-5", "abc", "all"):
        with pytest.raises(argparse.ArgumentTypeError):
            token_budget(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="or 'all'"):
        token_budget_or_all("0")


@pytest.mark.parametrize("module", ["fluxvit.stages.videotext.retrieval", "fluxvit.stages.finetune.eval"])
def test_cli_modules_run_without_runpy_warning(module):
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module,
                           "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RuntimeWarning" not in proc.stderr


# ------------------------------------------------------------------------------------------- launch check
def _acc(kind, n):
    return SimpleNamespace(distributed_type=SimpleNamespace(value=kind), num_processes=n)


def test_distributed_type_must_match_the_launch_config():
    ds2 = {"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}
    assert expected_distributed_types(ds2) == ({"DEEPSPEED"}, 2)
    check_distributed(_acc("DEEPSPEED", 2), ds2)
    with pytest.raises(DistributedMismatchError, match="asked for DEEPSPEED on 2 .* got MULTI_CPU on 2.*drop DeepSpeed"):
        check_distributed(_acc("MULTI_CPU", 2), ds2)  # ACCELERATE_USE_CPU=1 silently dropped DeepSpeed
    with pytest.raises(DistributedMismatchError, match="got DEEPSPEED on 1"):
        check_distributed(_acc("DEEPSPEED", 1), ds2)  # every rank alone: accelerate found no backend
    check_distributed(_acc("MULTI_CPU", 2), {"WORLD_SIZE": "2"})
    with pytest.raises(DistributedMismatchError):
        check_distributed(_acc("NO", 1), {"WORLD_SIZE": "2"})
    check_distributed(_acc("NO", 1), {})
    with pytest.raises(DistributedMismatchError):
        check_distributed(_acc("DEEPSPEED", 1), {})


# ------------------------------------------------------------------------------------------------- output
def test_log_lines_are_printed_once_when_a_library_logs_through_the_root_logger():
    # open_clip logs with logging.info(...), which runs basicConfig on a root logger without handlers.
    code = ("import logging\n"
            "from fluxvit.stages.common.runtime import setup_logging\n"
            "setup_logging(True)\n"
            "logging.info('open_clip style message')\n"
            "logging.getLogger('fluxvit.train').info('fluxvit line')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("fluxvit line") == 1, proc.stderr


class _Tty:
    def __init__(self):
        self.text = ""

    def isatty(self):
        return True

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_postfix_belongs_to_the_step_shown(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty())
    ml = MetricLogger(tmp_path, enabled=True, total=3, tensorboard=False, progress=True, log_every=100)
    assert ml.bar is not None
    shown = []
    real = ml.bar.update
    ml.bar.update = lambda n=1: (shown.append((ml.bar.n + n, ml.bar.postfix)), real(n))
    for step in (1, 2, 3):
        ml.log(step, {"loss": float(step * 10)})
    ml.close()
    assert shown == [(1, "loss=10"), (2, "loss=20"), (3, "loss=30")]


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stderr", SimpleNamespace(isatty=lambda: False, write=lambda s: None, flush=lambda: 0))
    ml = MetricLogger(tmp_path, enabled=True, total=3, tensorboard=False, progress=True)
    assert ml.bar is None  # a log file gets log lines, not carriage-return redraws
    ml.close()


def test_library_noise_is_silenced():
    import warnings

    from fluxvit.stages.common.runtime import quiet_third_party

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_third_party(progress=False)
        warnings.warn("find_unused_parameters=True was specified in DDP constructor, but did not find any unused "
                      "parameters in the forward pass.", UserWarning, stacklevel=1)
        warnings.warn("another warning stays visible", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another warning stays visible"]
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    import transformers

    assert not transformers.utils.logging.is_progress_bar_enabled()  # no "Loading weights" bar
    import huggingface_hub

    transformers.utils.logging.enable_progress_bar()
    huggingface_hub.utils.enable_progress_bars()
    os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS")


@pytest.mark.slow
def test_a_stage_run_logged_to_a_file_is_plain_and_quiet(tmp_path):
    """Stage 1 with its open_clip teacher, stderr to a file: each log line once, no carriage returns, no DeepSpeed
    accelerator notice at export."""
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        teacher = ["teacher.kind=open_clip", "teacher.name=", "teacher.pretrained=", "teacher.overrides={}",
                   "teacher.embed_dim=64", 'teacher.vision_cfg={"image_size": 112, "patch_size": 16, "width": 96, '
                   '"layers": 4, "head_width": 32}']  # a small random open_clip tower: open_clip logs via root
        sets = [f"train.run_dir={tmp_path / 'run'}", "train.steps=2", "train.eval_every=0", "train.tensorboard=false",
                "train.log_every=1", *teacher]
        proc = subprocess.run([sys.executable, "-m", "fluxvit.stages.distill", "--preset", "smoke",
                               *[a for x in sets for a in ("--set", x)]],
                              cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"))
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text  # progress=true by default, but not a terminal: log lines only
    assert text.count("saved checkpoint") == 1 and text.count("step 2: loss=") == 1
    assert "Setting accelerator to CPU" not in text and "exported student" in text
    assert "OpenCLIPTeacher" in text


def test_exports_get_the_mode_of_the_runs_other_files(tmp_path):
    from fluxvit.models import create_model, save_model

    old = os.umask(0o022)
    try:
        path = save_model(create_model("fluxvit_tiny_patch14", depth=1, num_classes=0), tmp_path / "w.safetensors")
        (tmp_path / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE((tmp_path / "config.json").stat().st_mode) == 0o644


# ----------------------------------------------------------------------------------------------- Makefile
@pytest.fixture
def fake_venv(tmp_path):
    """A venv whose python / accelerate print their arguments one per line."""
    bin_ = tmp_path / "venv" / "bin"
    bin_.mkdir(parents=True)
    for name in ("python", "accelerate"):
        (bin_ / name).write_text('#!/bin/sh\nfor a in "$@"; do echo "ARG:$a"; done\n')
        (bin_ / name).chmod(0o755)
    return tmp_path / "venv"


def _make(venv, *args):
    proc = subprocess.run(["make", "-s", "--no-print-directory", f"VENV={venv}", "STAMP=", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    return proc, [line[4:] for line in proc.stdout.splitlines() if line.startswith("ARG:")]


def test_make_keeps_brace_and_glob_patterns_as_one_argument(fake_venv):
    _, args = _make(fake_venv, "distill", "DATA=/d/train-{000..009}.tar", "PRESET=smoke")
    assert "data.shards=/d/train-{000..009}.tar" in args
    _, args = _make(fake_venv, "finetune", "ARGS=--set data.shards=/d/{00..03}.tar --set data.val_shards=/d/*.tar")
    assert "data.shards=/d/{00..03}.tar" in args and "data.val_shards=/d/*.tar" in args


@pytest.mark.parametrize("teacher,want", [
    ("/w/vitb16.bin", ["teacher.weights=/w/vitb16.bin", "teacher.pretrained="]),
    ("open_clip:ViT-L-14:openai", ["teacher.kind=open_clip", "teacher.name=ViT-L-14", "teacher.vision_cfg={}",
                                   "teacher.overrides={}", "teacher.pretrained=openai"]),
    ("fluxvit:fluxvit_base_patch14:/w/s1.safetensors", ["teacher.kind=fluxvit", "teacher.name=fluxvit_base_patch14",
                                                        "teacher.vision_cfg={}", "teacher.overrides={}",
                                                        "teacher.weights=/w/s1.safetensors",
                                                        "teacher.pretrained="]),
])
def test_make_distill_teacher_names_the_architecture(fake_venv, teacher, want):
    _, args = _make(fake_venv, "distill", f"TEACHER={teacher}")
    sets = [args[i + 1] for i, a in enumerate(args) if a == "--set" and args[i + 1].startswith("teacher.")]
    assert sets == want


def test_make_tokenopt_without_checkpoint_says_so(fake_venv, tmp_path):
    proc, args = _make(fake_venv, "tokenopt", f"CKPT={tmp_path}/none.safetensors")
    assert proc.returncode != 0 and args == []  # nothing was trained or run
    assert f"no checkpoint {tmp_path}/none.safetensors" in proc.stderr and "make finetune" in proc.stderr
