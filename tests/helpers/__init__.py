"""Fakes and fixtures shared by several test modules (the fixtures themselves: tests/conftest.py)."""
