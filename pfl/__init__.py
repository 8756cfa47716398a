"""pfl: personalized federated learning experiments tracked in MLflow."""

__version__ = "0.1.0"
