"""`python -m trainer ...` runs the `prefix-distill` app, so `torchrun -m trainer train ...` works for DDP."""

from services.cli import main

if __name__ == "__main__":
    main()
