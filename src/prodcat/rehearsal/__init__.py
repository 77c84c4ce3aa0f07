"""The scale rehearsal: the 5,270-leaf problem end to end on pictures, and the full row counts without them.

- `run_rehearsal` (`prodcat rehearsal`, `make rehearsal`): demo data of the real taxonomy's shape and long tail.
- `run_rehearsal_full` (`prodcat rehearsal-full`, `make rehearsal-full`): a synthetic 12.37 M-row feature store.
Every stage is recorded (wall time, peak RSS, disk written, throughput) in W/reports/rehearsal.json.
"""

from prodcat.rehearsal.drivers import RehearsalPlan, run_rehearsal, run_rehearsal_full
from prodcat.rehearsal.synthetic import FullPlan, write_synthetic_workdir

__all__ = ["RehearsalPlan", "FullPlan", "run_rehearsal", "run_rehearsal_full", "write_synthetic_workdir"]
