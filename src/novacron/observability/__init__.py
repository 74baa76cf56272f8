"""Logging, metrics and audit."""
