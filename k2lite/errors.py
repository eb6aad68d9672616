"""The one exception type users see for a bad checkpoint."""


class ModelFormatError(ValueError):
    """A checkpoint folder, file, header, tensor or config field is missing or malformed."""
