"""Exceptions core raises. InvalidInput and its subclasses are the user's fault (the API maps
them to 4xx problem+json, the CLI to exit 2); the rest are job failures."""


class CarcertError(Exception):
    """Base of every error core raises on purpose."""


class InvalidInput(CarcertError, ValueError):
    """Input the user can fix: bad reference, unknown name, wrong shape."""


class WeightsError(InvalidInput):
    """A checkpoint that cannot be loaded safely into the requested architecture."""


class DatasetError(InvalidInput):
    """A dataset reference that cannot be resolved or parsed, or lies outside the allowed roots."""


class TransformError(InvalidInput):
    """Unknown or malformed semantic transformation."""


class ProgramError(InvalidInput):
    """A torch.export program that cannot be loaded safely, pruned or run on the dataset."""


class TrainingDiverged(CarcertError):
    """A loss became NaN/inf; nothing is written."""


class Cancelled(CarcertError):
    """The job was cancelled cooperatively between steps."""
