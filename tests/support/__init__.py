"""Helpers shared by the tests (pipelines, run folders, an LDM key table)."""
