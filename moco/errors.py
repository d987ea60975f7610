"""User mistakes, reported as one actionable line (the scripts exit with code 2, no traceback)."""


class MocoUserError(Exception):
    """Base class: something the user can fix. The message says what is wrong and how to fix it."""


class ConfigError(MocoUserError):
    """An invalid or inconsistent configuration value."""


class DataError(MocoUserError):
    """Missing, empty or unreadable data."""


class TrainingDiverged(MocoUserError):
    """The loss or the weights became NaN or infinite; usually fixed by a lower learning rate."""
