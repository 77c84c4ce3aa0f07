"""Frozen pretrained backbones, extraction and the on-disk feature store."""
