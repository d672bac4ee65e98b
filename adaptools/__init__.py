"""adaptools: LoRA adapter arithmetic, SVD re-rank, DoRA conversion and streaming merges, on saved files."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("adaptools")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+source"

# The version is set first: modules below (recipe.py) record it.
from .adapter import Adapter, LoraModule
from .device import resolve_device
from .dora import LoraFitReport, ModuleFit, to_dora, to_lora
from .errors import (
    AdapterFormatError,
    AdaptoolsError,
    BaseMismatchError,
    DoraError,
    HubAccessError,
    HubError,
    HubNotFoundError,
    InputNotFoundError,
    InvalidArgumentError,
    JobsFileError,
    NonFiniteError,
    OutputExistsError,
    OutputLockedError,
    OutputWriteError,
    PickleNotAllowedError,
    RankMismatchError,
    RecipeError,
    ShapeMismatchError,
    UnknownModuleError,
    UnsupportedAdapterError,
)
from .batch import Job, JobResult, batch
from .combine import combine, interpolate, negate
from .extract import ExtractReport, ModuleExtract, extract
from .checkpoints import BaseCheckpoint, Container, GGUFFile, open_container
from .formats import detect_format, save_adapter
from .sources import load
from .formats.gguf_lora import write_gguf_adapter
from .formats.ia3 import read_ia3 as load_ia3
from .hub import push
from .ia3 import IA3Adapter, IA3Module
from .merge import MergeReport, merge, merge_many
from .nf4_checkpoint import quantize
from .rerank import ModuleRerank, RerankReport, rerank
from .spectrum import compare_spectra, spectrum
from .summary import gguf_summary

__all__ = [
    "Adapter",
    "AdapterFormatError",
    "AdaptoolsError",
    "BaseCheckpoint",
    "Container",
    "BaseMismatchError",
    "DoraError",
    "ExtractReport",
    "GGUFFile",
    "HubAccessError",
    "HubError",
    "HubNotFoundError",
    "IA3Adapter",
    "IA3Module",
    "InputNotFoundError",
    "InvalidArgumentError",
    "LoraFitReport",
    "LoraModule",
    "Job",
    "JobResult",
    "JobsFileError",
    "MergeReport",
    "ModuleExtract",
    "ModuleFit",
    "ModuleRerank",
    "NonFiniteError",
    "OutputExistsError",
    "OutputLockedError",
    "OutputWriteError",
    "PickleNotAllowedError",
    "RankMismatchError",
    "RecipeError",
    "RerankReport",
    "ShapeMismatchError",
    "UnknownModuleError",
    "UnsupportedAdapterError",
    "__version__",
    "batch",
    "combine",
    "compare_spectra",
    "detect_format",
    "extract",
    "gguf_summary",
    "interpolate",
    "load",
    "load_ia3",
    "merge",
    "merge_many",
    "write_gguf_adapter",
    "negate",
    "open_container",
    "push",
    "quantize",
    "rerank",
    "resolve_device",
    "save_adapter",
    "spectrum",
    "to_dora",
    "to_lora",
]
