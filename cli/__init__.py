"""Thin click commands."""
