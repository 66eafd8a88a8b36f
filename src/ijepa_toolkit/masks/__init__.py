"""Mask samplers for masked-image pretraining."""
