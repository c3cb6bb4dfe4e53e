"""Flax model families in lorax's canonical param layout."""
