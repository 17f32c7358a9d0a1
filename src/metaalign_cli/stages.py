"""The names the dataset and the trainer share, in a module light enough for the CLI to import at
start-up (the ``train --stages`` choices):

- :data:`STAGES`: the three training stages of paper section 3.3, in training order: warm-up
  (identity mapping), equal-preference (D_e), preference (D_p);
- :data:`SPLITS`: the dataset splits ``build-data`` writes.
"""

STAGES = ("warmup", "equal", "preference")
SPLITS = ("train", "validation", "test")
