"""The one exception the converters raise for bad input: it names the file, tensor or key at fault."""


class ConversionError(ValueError):
    """A checkpoint cannot be converted (missing / unexpected / misshapen tensor, bad file, existing dst)."""
