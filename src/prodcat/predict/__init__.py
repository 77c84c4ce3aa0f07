"""Prediction: one Predictor (`predictor`) behind the CLI, the Kaggle submission (`submission`) and the
server, and everything it applies after the head: product aggregation, calibration, training twins, prototypes and
the text model."""
