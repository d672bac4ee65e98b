"""Streaming merge of LoRA/DoRA adapters into a base checkpoint (DESIGN §8): plan, validate, then one pass.

The engine, one module per job (arrows point down):
- `api`: the public `merge` call (validate, plan, run, warn).
- `plan`: every adapter module fitted to its base weight (fan_in_fan_out resolved by shape; all offenders listed
  at once, before anything is written), each output's updates, the read steps (same-shape tensors of a shard in
  chunks of at most `batch_bytes` as float32) and the output files' layout.
- `execute`: one pass over the base on worker threads; each step is read once and feeds every output (several
  adapters → several merged models); results go straight into byte ranges planned up front.
- `kernels`: the batched math, one class per kind of update (`LoraUpdate`: W' = W + L·R with one `baddbmm` per
  tile of rows; `DoraUpdate`: then each row scaled to its magnitude; `RowBlockUpdate`: either, per row block of a
  fused weight). A new kind is one `Update` subclass.
- `report`: the MergeReport and its warnings.
Below the engine, `adaptools.checkpoints` (DESIGN §14): the base's container (what it lists and how its outputs
are written), its name map (where each module's update lands) and the codecs (how stored base tensors become the
tensors that are merged, and how results are stored); `adaptools.quantize` uses the same pass with no adapters
and a quantizing encoder.
"""
from __future__ import annotations

from .api import merge, merge_many
from ..checkpoints.stored import DTYPES, CastEncoder, StoredDecoder, TensorSpec, parse_dtype
from .execute import BATCH_BYTES, write_outputs
from .kernels import DoraUpdate, LoraUpdate, Update, dora_merge_rows, lora_merge
from .plan import OutputPlan
from .report import MergeReport

__all__ = [
    "BATCH_BYTES",
    "DTYPES",
    "CastEncoder",
    "DoraUpdate",
    "LoraUpdate",
    "MergeReport",
    "OutputPlan",
    "StoredDecoder",
    "TensorSpec",
    "Update",
    "dora_merge_rows",
    "lora_merge",
    "merge",
    "merge_many",
    "parse_dtype",
    "write_outputs",
]
