"""Heads and losses trained on cached features, with their registries."""
