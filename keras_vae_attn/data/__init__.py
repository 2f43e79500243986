"""Dataset readers and generated stand-ins; one module per dataset."""


class DataError(ValueError):
    """A dataset file or folder is missing, corrupt or inconsistent; the message names it."""
