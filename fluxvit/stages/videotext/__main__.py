"""``python -m fluxvit.stages.videotext`` / ``accelerate launch -m fluxvit.stages.videotext``."""
from ..common.cli import run_cli
from .train import main

if __name__ == "__main__":
    run_cli(main, "fluxvit.stages.videotext")
