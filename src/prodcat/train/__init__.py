"""Training: the fit loop on cached features (`loop`), experiments over runs (`experiments`: compare,
sweep), and the OCR text head beside a picture head (`text_fusion`)."""

import os

# Set before any submodule loads torch (libgomp reads it once, when torch loads it); a value the user set wins.
# On a shared or oversubscribed CPU, OpenMP's default spin-then-sleep barriers cost a 5,270-class training step
# 3x the CPU it needs, a fixed ~0.15-0.3 s per step whatever the batch; PASSIVE lets idle threads sleep at once and
# leaves every number the same (docs/scale.md, "The fixed cost of a training step").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
