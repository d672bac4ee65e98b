"""Merge execution: one pass over the base, steps on worker threads, every output written atomically.

Each step (same-shape tensors of one shard) is read once (memory-mapped) and feeds every output. Steps run on
worker threads; every output tensor has a byte range planned up front, so results are written where they belong
in whatever order they are done. On the CPU the merge kernels run per cache-sized tile of rows (a weight is
read, merged, cast and written without leaving the cache), on an accelerator per whole step. Tensors no output
changes are copied file to file.
"""
from __future__ import annotations

import contextlib
import functools
import queue
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..atomic import atomic_output
from ..device import torch_threads
from ..digests import SequentialHasher, file_key, lookup
from ..checkpoints.container import Container, Sink
from ..recipe import RECIPE_NAME
from ..checkpoints.stored import CastEncoder, StoredDecoder, TensorSpec, check_range
from .kernels import Buffers, changed_value, merge_weights
from .plan import OutputPlan, Step, interleave_shards, mixed_order, plan_layout, plan_steps
from .report import MergeReport, peak_rss

BATCH_BYTES = {"cpu": 2**25, "cuda": 2**28}
"""Default float32 bytes of base weights merged in one step, per device type."""
TILE_BYTES = {"cpu": 2**21}
"""Float32 bytes of rows merged at once on the CPU (cache-sized); other devices merge whole steps."""
MAX_WORKERS = 8
"""At most this many steps run at once on the CPU (each holds its step's tensors)."""


def merge_step(step: Step, stored: dict[str, Tensor], specs: dict[str, TensorSpec], plan: OutputPlan,
               encoder: CastEncoder, device: torch.device, buffers: Buffers,
               tile_elems: int | None) -> Iterator[tuple[str, int, Tensor]]:
    """(key, first row, rows in the encoder's dtype) for the step's tensors that this output changes or casts:
    merged weights in tiles of rows when the encoder is row-wise, other tensors whole.

    The others are kept as stored. Each yielded tensor must be written before the next is asked for.
    """
    dtype = encoder.dtype_for(specs[step.keys[0]])
    current = dict(stored)
    changed = {}
    for key in current:
        value = changed_value(key, stored[key], plan.full.get(key), plan.biases.get(key))
        if value is not None:
            current[key] = changed[key] = value
    updates = {k: plan.updates[k] for k in step.keys if k in plan.updates}
    yield from merge_weights(updates, current, dtype, device, buffers, tile_elems if encoder.row_wise else None)
    for key in step.keys:
        if key not in updates and (key in changed or not encoder.keeps(key, specs[key])):
            check_range([key], current[key].unsqueeze(0), dtype)
            yield key, 0, current[key].to(dtype)


def run_step(step: Step, ckpt: Container, specs: dict[str, TensorSpec], plans: Sequence[OutputPlan],
             sinks: Sequence[Sink], decoder: StoredDecoder, encoder: CastEncoder, device: torch.device,
             buffers: Buffers, tile_elems: int | None, survival: Sequence[dict[str, float]]) -> int:
    """Read the step's tensors that some output changes or casts (once), merge them per output, write everything;
    the encoder's survival of each merged weight goes into `survival` (one dict per output). Returns the step's
    stored bytes."""
    needed = [k for k in step.keys if not encoder.keeps(k, specs[k]) or any(plan.changes(k) for plan in plans)]
    stored = {k: decoder.read_into(ckpt, k, functools.partial(buffers.take, f"base {i}")) for i, k in enumerate(needed)}
    for plan, sink, kept in zip(plans, sinks, survival):
        written = set()
        for key, row, tensor in merge_step(step, stored, specs, plan, encoder, device, buffers, tile_elems):
            whole = row == 0 and tuple(tensor.shape) == specs[key].shape
            measured = whole and key in plan.updates
            encoded, fraction = encoder.encode_merged(key, tensor, stored[key]) if measured else \
                (encoder.encode(key, tensor), None)
            for out_key, value in encoded.items():
                sink.write(out_key, value, row, None if whole else specs[key].shape[0])
            written.add(key)
            if fraction is not None:
                kept[key.removesuffix(".weight")] = fraction
        for key in step.keys:
            if key not in written:
                for out_key, (path, info) in decoder.sources(ckpt, key).items():
                    sink.copy(out_key, path, info)
    return sum(specs[k].nbytes for k in step.keys)


def worker_count(device: torch.device, encoder: CastEncoder) -> int:
    """Steps run at once: on the CPU one per torch thread (up to MAX_WORKERS), each running its torch ops
    single-threaded; on an accelerator two (one reads and writes while the other computes). Encoders of whole
    tensors (NF4) run the same way: the NF4 codec works in cache-sized chunks, so its temporaries stay small."""
    return max(1, min(torch.get_num_threads(), MAX_WORKERS)) if device.type == "cpu" else 2


def run_steps(steps: Sequence[Step], run: Callable[[Step, Buffers], int], workers: int, progress: tqdm) -> None:
    """`run(step, buffers)` for every step on `workers` threads (each with its own Buffers), advancing `progress`
    by what each returns; the first failure cancels the steps not yet started and is raised here."""
    free: queue.SimpleQueue[Buffers] = queue.SimpleQueue()
    for _ in range(workers):
        free.put(Buffers())

    def task(step: Step) -> int:
        buffers = free.get()
        try:
            return run(step, buffers)
        finally:
            free.put(buffers)

    with ThreadPoolExecutor(workers, thread_name_prefix="adaptools-merge") as pool:
        futures = [pool.submit(task, step) for step in steps]
        try:
            for future in as_completed(futures):
                progress.update(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def shard_hashers(ckpt: Container) -> dict[Path, SequentialHasher]:
    """A file-order sha256 per base shard whose digest is not known yet (`digests.lookup`: persisted by an earlier
    command)."""
    hashers: dict[Path, SequentialHasher] = {}
    try:
        for shard in ckpt.shards:
            infos = [ckpt.info(key) for key in ckpt.shard_keys(shard)]
            size = max((info.end for info in infos), default=None)  # the header's validation: no byte after the data
            if lookup(ckpt.root / shard) is not None and file_key(ckpt.root / shard).size == size:
                continue
            hashers[ckpt.root / shard] = SequentialHasher(ckpt.root / shard, size)
    except BaseException:
        for hasher in hashers.values():
            hasher.close()
        raise
    return hashers


def output_paths(target: Path | Sequence[Path], plans: Sequence[OutputPlan], each: bool,
                 suffix: str | None) -> list[Path]:
    """Where each plan's output is: `target`; with `each`, `target/<plan name>` (`<plan name><suffix>` for
    single-file outputs, e.g. `.safetensors`, `.gguf`; `suffix` None: folders); or, for a list of paths, plan i's
    own path."""
    if isinstance(target, Path):
        return [target / (plan.name if suffix is None else f"{plan.name}{suffix}") if each else target
                for plan in plans]
    return list(target)


def output_suffix(ckpt: Container) -> str | None:
    """The suffix of the container's single-file outputs, None when its outputs are folders."""
    return ckpt.output_suffix if ckpt.output_is_file else None


@contextlib.contextmanager
def output_folders(target: Path | Sequence[Path], plans: Sequence[OutputPlan], each: bool, overwrite: bool,
                   suffix: str | None) -> Iterator[list[Path]]:
    """The staged place of every plan (output_paths inside one atomic `target`, or one atomic output per plan for
    a list of paths); all are renamed into place on success. `suffix`: that of single-file outputs (None:
    folders)."""
    is_file = suffix is not None
    with contextlib.ExitStack() as stack:
        if isinstance(target, Path):
            tmp = stack.enter_context(atomic_output(target, overwrite=overwrite, is_file=is_file and not each))
            yield output_paths(tmp, plans, each, suffix)
        else:
            yield [stack.enter_context(atomic_output(t, overwrite=overwrite, is_file=is_file)) for t in target]


def write_outputs(ckpt: Container, specs: dict[str, TensorSpec], plans: Sequence[OutputPlan],
                  decoder: StoredDecoder, encoder: CastEncoder, target: Path | Sequence[Path], *, each: bool,
                  device: torch.device,
                  overwrite: bool, shard_bytes: int | None, batch_bytes: int | None, progress: bool,
                  hash_inputs: bool = False, desc: str = "merging") -> MergeReport:
    """One pass over the base: every output plan (no updates: the base re-encoded) written atomically to `target`
    (with `each`, to `target/<plan name>`; a list of paths: plan i to `target[i]`, each its own atomic output),
    read through `decoder`, written through `encoder`. With `hash_inputs`,
    the sha256 of every base shard and side file is taken during this pass (`adaptools.digests`: one worker hashes
    each shard in order while the others merge)."""
    start = time.perf_counter()
    batch_bytes = batch_bytes or BATCH_BYTES.get(device.type, BATCH_BYTES["cuda"])
    steps = mixed_order(plan_steps(specs, batch_bytes))
    encoder.check({key for plan in plans for key in (*plan.updates, *plan.biases, *plan.full)})
    layout = plan_layout(ckpt, steps, specs, encoder, shard_bytes)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    total = sum(s.nbytes for s in specs.values())
    survival: list[dict[str, float]] = [{} for _ in plans]
    workers = worker_count(device, encoder)
    tile_elems = TILE_BYTES[device.type] // 4 if device.type in TILE_BYTES else None

    hashers = shard_hashers(ckpt) if hash_inputs else {}

    def run(step: Step, buffers: Buffers) -> int:
        read = run_step(step, ckpt, specs, plans, sinks, decoder, encoder, device, buffers, tile_elems, survival)
        for hasher in hashers.values():  # the first worker here hashes the shard while the others merge
            hasher.hash_rest()
        return read

    sinks: list[Sink] = []
    with output_folders(target, plans, each, overwrite, output_suffix(ckpt)) as places:
        try:
            sinks += [ckpt.open_output(place, encoder, layout, hash_inputs=hash_inputs and i == 0,
                                       skip=(RECIPE_NAME,))  # the base's recipe is not this one's
                      for i, place in enumerate(places)]
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                      disable=not progress, file=sys.stderr) as bar, \
                    torch_threads(1 if device.type == "cpu" and workers > 1 else None):
                run_steps(interleave_shards(steps, specs), run, workers, bar)
            for hasher in hashers.values():
                hasher.finish()
            for sink in sinks:
                sink.close(total_parameters=sum(s.numel for s in specs.values()))
        finally:
            for hasher in hashers.values():
                hasher.close()
            for sink in sinks:
                sink.abort()
    return MergeReport(
        outputs=dict(zip((plan.name for plan in plans), output_paths(target, plans, each, output_suffix(ckpt)))),
        modules={plan.name: len(plan.updates) for plan in plans},
        tensors=len(specs),
        bytes_read=total,
        bytes_written=sum(s.total_size for s in sinks),
        seconds=time.perf_counter() - start,
        peak_rss=peak_rss(),
        peak_device_memory=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        device=str(device),
        dtype=encoder.label,
        quantized=encoder.quantized,
        survival={plan.name: kept for plan, kept in zip(plans, survival) if kept},
        base=ckpt.label,
        output_files=ckpt.output_is_file,
    )
