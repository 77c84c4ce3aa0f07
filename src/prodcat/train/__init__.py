"""Training: the fit loop on cached features (`loop`), experiments over runs (`experiments`: compare,
sweep), and the OCR text head beside a picture head (`text_fusion`)."""
