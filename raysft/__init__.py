"""raysft: supervised fine-tuning of chat models on Ray (Ray Data to prepare, Ray Train to train)."""

__version__ = "0.1.0"
