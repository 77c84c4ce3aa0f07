"""Reading the text on product pictures (covers of books, music, films, games): engines, the `prodcat ocr` stage,
a cheap text-presence test and hashed text features. Nothing else in prodcat imports this package, so prodcat works
without an OCR engine installed."""
