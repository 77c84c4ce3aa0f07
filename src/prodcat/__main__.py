"""`python -m prodcat` (and `torchrun -m prodcat`) run the CLI."""

from prodcat.cli import app

if __name__ == "__main__":
    app()
