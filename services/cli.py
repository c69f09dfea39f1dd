"""Temporary alias of services.app.cli while the trainer's entry point moves (removed in the same change)."""

from services.app.cli import app, main  # noqa: F401

if __name__ == "__main__":
    main()
