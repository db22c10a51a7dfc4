"""The package version, apart from the package root so modules can read it without importing it."""

__version__ = "0.1.0"
