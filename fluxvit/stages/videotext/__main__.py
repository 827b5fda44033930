"""``python -m fluxvit.stages.videotext`` / ``accelerate launch -m fluxvit.stages.videotext``."""
from .train import main

if __name__ == "__main__":
    main()
