"""The error every refusal of bad input raises: its message is one line meant for the user."""


class SettingsError(ValueError):
    """A setting a run cannot start with; its message is one line meant for the user."""
