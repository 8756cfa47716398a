"""The errors of dataset loading, shared by every loader (:mod:`pfl.data.datasets` re-exports them)."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset folder is missing or incomplete; the message says where pfl looked and what to do."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is unreadable, refused, or holds data of the wrong shape or label range."""
