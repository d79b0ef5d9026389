"""Running a recipe: the command line (:mod:`.cli`, ``python train.py``) and what keeps a long run safe
(:mod:`.faults`: last.ckpt at every save point, atomic checkpoints, exact resume, signals, non-finite
losses). Nothing here is imported by the models, layers or data; this is the top of the package."""
