"""The synthetic demo catalogue: its generator (`demo`), names, statistics and book/music/film covers.

Only the demo, the rehearsal and tests import this; production inference never does."""
