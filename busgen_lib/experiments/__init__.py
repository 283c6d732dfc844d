"""Experiments: studies that train generators and diagnostic models end to end (top of the import stack).

`data` ← `diffusion`, `devices` ← `evaluate`, `downstream` ← `experiments` ← notebooks, CLI.
"""
