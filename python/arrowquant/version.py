"""The package version (one place; arrowquant.__version__ re-exports it)."""

__version__ = "0.1.0"
