"""``python -m fluxvit.stages.distill`` / ``accelerate launch -m fluxvit.stages.distill``."""
from ..common.cli import run_cli
from .train import main

if __name__ == "__main__":
    run_cli(main, "fluxvit.stages.distill")
