"""``python -m fluxvit.stages.finetune`` / ``accelerate launch -m fluxvit.stages.finetune``."""
from ..common.cli import run_cli
from .train import main

if __name__ == "__main__":
    run_cli(main, "fluxvit.stages.finetune")
