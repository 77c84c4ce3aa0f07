"""Reading the text on product pictures (covers of books, music, films, games): engines, the `prodcat ocr` stage,
a cheap text-presence test, hashed text features and their fusion with the picture head (fusion.py). The Predictor
imports only fusion.py (no engine) to load a run's text model when there is one, and builds the engine on first
use, so prodcat works without an OCR engine installed."""
