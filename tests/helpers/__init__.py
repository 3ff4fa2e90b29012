"""Tiny models and fixtures shared by the tests, written to temporary directories in the real formats."""
