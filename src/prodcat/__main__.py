"""`python -m prodcat` (and `torchrun -m prodcat`) run the CLI."""

from prodcat.cli import main

if __name__ == "__main__":
    main()
