"""recsys: sequential recommendation with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
