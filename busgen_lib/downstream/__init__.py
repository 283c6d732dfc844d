"""Downstream diagnostic models trained on real and generated data (BUS-DM, §4.4)."""
