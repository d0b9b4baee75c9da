"""Shared pytest setup. Area fixtures live in tests/fixtures/ and per-area conftest files."""

pytest_plugins = ["tests.fixtures.docker"]
