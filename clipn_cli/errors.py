"""Typed errors the library raises; the CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations


class ClipnError(Exception):
    """Base class: a problem the user can fix (bad file, bad option, missing weights)."""


class WeightsError(ClipnError):
    """Weights are missing, unreadable, unsafe or do not fit the model architecture."""


class FetchError(WeightsError):
    """A download failed, cannot start (offline) or was refused (size or checksum mismatch)."""


class ConfigError(ClipnError):
    """The model architecture cannot be resolved from a name, a file or tensor shapes."""


class ClassesError(ClipnError):
    """Class names are missing or unreadable."""


class TemplatesError(ClipnError):
    """A prompt template set is unknown or malformed."""


class EmbeddingsError(ClipnError):
    """A class-embeddings file is unreadable or was made with other weights."""


class OutputError(ClipnError):
    """An output file cannot be continued (`--resume` on a file that is not clipn's JSON Lines)."""


class ImageError(ClipnError):
    """One image could not be read; reported per input, never fatal to a run."""


class CacheError(ClipnError):
    """The feature cache directory cannot be used."""


class EvaluationError(ClipnError):
    """An evaluation cannot run: an image set is missing, empty, or wrongly specified."""


class DataError(ClipnError):
    """A training data source is missing, malformed or holds no usable sample."""


class TrainError(ClipnError):
    """A training run cannot start or resume (bad base, options or checkpoint)."""


class CalibrationError(ClipnError):
    """A calibration file is unreadable, made for other weights/classes/templates, or too small for α."""


class OptionsError(ClipnError, ValueError):
    """An option's value is outside its choices or range (also a ValueError, as before)."""


class DeviceError(OptionsError):
    """A device is misspelt or not present on this machine."""


class RuleError(OptionsError):
    """A verdict rule or score method is unknown, or cannot run with these weights and heads."""


class ScoresError(ClipnError, ValueError):
    """Scores cannot give a metric: there are none, or some are NaN or Inf."""


class VerdictError(ClipnError):
    """A verdict cannot be given as asked: a rule without a threshold-free verdict and no cut, or two cuts at once."""
