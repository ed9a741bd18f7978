"""chatrlhf: make a chat language model better with human feedback, end to end."""

__version__ = "0.1.0"
