"""Frozen-encoder evaluation protocols."""
