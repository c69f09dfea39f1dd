"""`python -m services.app ...` runs the `prefix-distill` console script."""

from services.app.cli import main

if __name__ == "__main__":
    main()
