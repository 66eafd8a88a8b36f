"""Frozen-feature evaluation protocols."""
