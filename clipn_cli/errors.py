"""Typed errors the library raises; the CLI turns each into a one-line message and exit code 2."""

from __future__ import annotations

import os


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


class FileFormatError(ClipnError, ValueError):
    """A file is not what its kind must be: too large, not a regular file, JSON past its limits, not
    UTF-8, a damaged safetensors header or shard. The message says what, fit to follow the file's
    name: a reader usually wraps it in its own error naming the file; where none does, `path` (when
    the raiser knew it) lets the CLI still name the file. Also a ValueError, as these always were."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = path

    def one_line(self) -> str:
        """The message, after the file's name when it is known."""
        return f"{os.fsdecode(self.path)}: {self}" if self.path is not None else str(self)


class FileTooLargeError(FileFormatError):
    """A file over the size limit of its kind (refused by its size, or by a read of one byte more)."""


class NotRegularFileError(FileFormatError):
    """A path names a device, socket or pipe: reading it could block for ever or never end."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__("not a regular file (device, socket or pipe)", path)


class JSONLimitError(FileFormatError):
    """JSON refused before it was parsed: too many values or containers, or nested too deeply."""


class UnicodeTextError(FileFormatError):
    """Text that is not UTF-8: `offset` is the first bad byte's offset in the file, `line` its line (from 1)."""

    def __init__(self, offset: int, line: int, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(f"not UTF-8 text (byte {offset}, line {line})", path)
        self.offset, self.line = offset, line


class SafetensorsError(FileFormatError):
    """The file is not a well-formed safetensors file; the message says what is wrong."""


class ShardError(FileFormatError):
    """A shard file of a Ray output folder is not what the run wrote: the message says what, the reader names the file."""
