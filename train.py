"""Train and test a recipe: ``python train.py --config configs/quickstart.yaml`` (``--help`` for all options)."""
from aa_lightning.cli import main

if __name__ == "__main__":
    main()
