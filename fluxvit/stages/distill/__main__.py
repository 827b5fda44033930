"""``python -m fluxvit.stages.distill`` / ``accelerate launch -m fluxvit.stages.distill``."""
from .train import main

if __name__ == "__main__":
    main()
