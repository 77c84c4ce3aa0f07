"""Figures, exploration and the HTML report."""
