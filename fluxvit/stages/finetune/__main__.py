"""``python -m fluxvit.stages.finetune`` / ``accelerate launch -m fluxvit.stages.finetune``."""
from .train import main

if __name__ == "__main__":
    main()
