"""The one exception type a user is meant to see: its message is printed as a one-line error."""


class PrunelensError(Exception):
    """Bad input or an unusable environment, explained in one line for the user."""
