"""Typed exceptions: every mistake a user can make has one; the CLI prints them as one `error:` line."""


class AdaptoolsError(Exception):
    """Base of every error adaptools raises on bad input."""


class InputNotFoundError(AdaptoolsError):
    """A path given as input does not exist."""


class AdapterFormatError(AdaptoolsError):
    """A file or folder is not a readable adapter (bad JSON, corrupt safetensors, missing keys)."""


class UnsupportedAdapterError(AdapterFormatError):
    """The adapter is of a type adaptools does not handle (IA3, LoHa, ...)."""


class PickleNotAllowedError(AdaptoolsError):
    """A pickle (.bin) file would have to be loaded and the user did not allow it."""


class ShapeMismatchError(AdaptoolsError):
    """Tensor shapes disagree with each other, with the config, or with the base."""


class RankMismatchError(ShapeMismatchError):
    """A and B of one module have different ranks."""


class NonFiniteError(AdaptoolsError):
    """A tensor holds NaN or Inf (in an input, or a result would)."""


class BaseMismatchError(AdaptoolsError):
    """The base checkpoint does not fit the adapter (missing modules, other shapes)."""


class UnknownModuleError(BaseMismatchError):
    """A module named by the adapter or the user is not in the base."""


class OutputExistsError(AdaptoolsError):
    """The output path exists and overwriting was not asked for."""


class OutputLockedError(OutputExistsError):
    """Another adaptools run is writing the same output (it holds the lock beside the target)."""


class OutputWriteError(AdaptoolsError):
    """The output could not be written (a full disk, a lost permission); nothing of it is left behind."""


class InvalidArgumentError(AdaptoolsError):
    """An option value is out of range or options contradict each other."""


class DoraError(AdaptoolsError):
    """An operation is not defined for DoRA adapters as given (or needs one)."""


class HubError(AdaptoolsError):
    """A Hub request failed (pushing, or downloading an input: authentication, missing repo, network)."""


class HubAccessError(HubError):
    """The Hub refused access (401/403): bad credentials, or a gated or private repo the token may not read."""


class HubNotFoundError(HubError, InputNotFoundError):
    """A Hub input names a repo, revision or file that does not exist (or that the token may not see)."""


class RecipeError(AdaptoolsError):
    """A recipe file is unreadable, or an input changed since the recipe was recorded."""


class JobsFileError(InvalidArgumentError):
    """A batch jobs file is unreadable or one of its jobs is invalid (the message names the job's index and key)."""
