"""Datasets, subsets and transforms."""
