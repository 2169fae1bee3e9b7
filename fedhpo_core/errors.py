"""The error every refusal of bad input raises: its message is one line meant for the user."""


class SettingsError(ValueError):
    """A setting a run cannot start with; its message is one line meant for the user."""


def one_line(error: BaseException) -> str:
    """An error's message on one line, at most 300 characters."""
    return " ".join(str(error).split())[:300]
