"""Train and test a recipe: ``python train.py --config configs/quickstart.yaml`` (``--help`` for all options)."""

import os
import time

START = time.perf_counter()

# OpenMP threads that spin while waiting turn a CPU shared with any other busy process into a
# crawl (measured here: 100x slower steps on 2 cores); passive waiting costs little otherwise.
# Must be set before torch loads its OpenMP runtime; export OMP_WAIT_POLICY=ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from aa_lightning.training.cli import main  # noqa: E402

if __name__ == "__main__":
    main(start_time=START)
