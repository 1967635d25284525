"""Hardening jobs: the rows, their life cycle and their artifacts."""
