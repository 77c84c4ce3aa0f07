"""Evaluation: select on val, report on holdout (`evaluation`); the levers table (`levers`)."""
