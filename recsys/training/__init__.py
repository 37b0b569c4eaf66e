"""Training: the one LightningModule every network trains and is evaluated in."""
