"""The package version (one place: ``pyproject.toml`` must agree; tests check it)."""
__version__ = "0.1.0"
