"""prodcat: sort e-commerce products into thousands of categories from their photos."""

__version__ = "0.1.0"
