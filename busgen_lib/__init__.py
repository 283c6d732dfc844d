"""busgen: BUSGen, CoLDiT and multi-view lesion recognition for breast ultrasound."""

__version__ = "0.1.0"
