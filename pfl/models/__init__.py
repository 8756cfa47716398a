"""Models split into ``base`` (feature extractor) + ``head`` (projection head)."""

from pfl.models.cnn import CNN
from pfl.models.split import ModelSpec, SplitModel, build_model

__all__ = ["CNN", "ModelSpec", "SplitModel", "build_model"]
