"""Manifests, validation, importers, the BUS phantom and torch datasets."""
