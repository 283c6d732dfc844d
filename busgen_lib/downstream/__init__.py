"""Downstream models of §4.4: BUS-DM classifiers, Baseline-CLIP, the detector, and their CLI."""
