"""The NVIDIA DALI input pipeline of ``data.loader: dali`` (install with ``pip install .[dali]``).

Reads the ``imagenet`` and ``folder`` datasets, as folders or packed (each sample's bytes from the dataset's
``encoded(i)``: `evit.data.datasets`, `evit.data.packed`), and covers the ``deit`` augment of the
scratch and finetune recipes:

- **Training** (`DaliTrainLoader`): decode only the RandomResizedCrop window of each JPEG (an ROI decode: the
  "mixed" decoder, nvJPEG / the hardware decoder, on a GPU; libjpeg-turbo in DALI's CPU mode), resize it to
  ``model.img_size`` with ``train.interpolation``, flip, then timm's RandAugment (``train.aa``, e.g.
  ``rand-m9-mstd0.5-inc1``: timm's op set, ``n`` ops drawn with replacement, each applied with probability
  0.5 at magnitude ``m`` + N(0, mstd) clipped to [0, 10]), written as DALI ``@augmentation`` ops
  (`evit.data.dali_augment`). Batches come out as uint8 (N, 3, H, W) on the training device; normalization,
  random erasing and Mixup/CutMix follow on the device batch, as for the torch loader.
- **Evaluation** (`DaliEvalLoader`): resize the shorter side to ``floor(img_size / crop_pct)``, centre crop,
  normalize; the val set is sharded as `evit.data.samplers.ShardSampler` shards it.

Randomness. DALI's own random operators keep a state that depends on how many batches a pipeline has run, so
they are not used. Every random choice for a sample (its crop window, its flip, and RandAugment's ops,
magnitudes and signs) is drawn on the host from the sample's seed, which `evit.data.samplers.TrainSampler`
derives from (seed, epoch, position), and handed to DALI with the encoded image. The order is
`TrainSampler`'s, sharded by rank. So the batches are a function of (seed, epoch, position) alone, as with the
torch loader: the same seed gives the same batches, and a run resumed mid-epoch continues exactly.

Devices. With a CUDA training device DALI decodes and augments on that GPU; on a machine without one it runs
in DALI's CPU mode (``device_id=None``) on ``data.num_workers`` threads, and the trainer says so in its log.
Both decoders upsample JPEG chroma as libjpeg-turbo and PIL do (``jpeg_fancy_upsampling``; DALI's GPU decoder
does not by default). On the host (`evit.data.dali_sources`), a training batch's files are read and its draws
made in ``data.num_workers`` spawned worker processes (DALI's parallel external source), off the training
thread; evaluation reads its files on threads of the training process. A feeding thread of the training
process runs each pipeline (receives the workers' batches, feeds them to DALI, schedules its runs) and hands its
finished batches over through a queue (`Feeder`): the training thread only takes them.

Where it differs from timm's PIL transforms (measured in tests/test_dali.py, README "Input pipeline"): the
RandAugment ops' differences (`evit.data.dali_augment`); resizes use DALI's antialiased cubic filter, which does
not clip PIL's intermediate (between passes) values.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from typing import Callable, Iterator, Sequence

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.auto_aug.core import select, signed_bin
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from evit.errors import ConfigError, EvitError
from evit.data.dali_augment import NUM_MAGNITUDE_BINS, RandAugmentSpec, rand_augment_ops
from evit.data.dali_sources import PREFETCH_DEPTH, EvalSource, TrainBatches
from evit.data.samplers import ShardSampler


# --------------------------------------------------------------------------------------------- pipelines

INTERPOLATIONS = {"bicubic": types.INTERP_CUBIC, "bilinear": types.INTERP_LINEAR, "nearest": types.INTERP_NN}


@pipeline_def(enable_conditionals=True)
def train_pipeline(source, img_size: int, interpolation: str, names: Sequence[str], fill: Sequence[int],
                   num_layers: int, gpu: bool, parallel: bool = False):
    """Training images as uint8 (3, img_size, img_size) and labels, from batches of `TrainBatches`' columns:
    the encoded images, the labels, and each sample's draws. ``parallel``: ``source`` is a `TrainBatches`,
    called in DALI's worker processes (the pipeline's ``py_num_workers``)."""
    kind = (dict(parallel=True, batch_info=True, prefetch_queue_depth=PREFETCH_DEPTH) if parallel
            else dict(cycle="raise"))
    jpegs, labels, draws = fn.external_source(source, num_outputs=3, batch=True, dtype=[types.UINT8, types.INT64,
                                                                                       types.INT32], **kind)
    images = fn.decoders.image_slice(jpegs, draws[0:2], draws[2:4], device="mixed" if gpu else "cpu",
                                     output_type=types.RGB, normalized_anchor=False, normalized_shape=False,
                                     adjust_orientation=False,      # as PIL opens it (no EXIF rotation)
                                     jpeg_fancy_upsampling=True)    # the GPU's chroma upsampling as PIL's
    images = fn.resize(images, size=[img_size, img_size], interp_type=INTERPOLATIONS[interpolation],
                       antialias=True)
    images = fn.flip(images, horizontal=draws[4])
    augs = rand_augment_ops(names, img_size, fill)
    for layer in range(num_layers):
        op, magnitude_bin, sign = (draws[5 + layer + k * num_layers] for k in range(3))
        images = select(augs, op, images, magnitude_bin=signed_bin(magnitude_bin, sign),
                        num_magnitude_bins=NUM_MAGNITUDE_BINS)
    return fn.transpose(images, perm=[2, 0, 1]), labels


@pipeline_def
def eval_pipeline(source, img_size: int, interpolation: str, mean: Sequence[float], std: Sequence[float],
                  gpu: bool):
    """Evaluation images, normalized float (3, img_size, img_size), and labels, from `EvalSource`'s batches."""
    jpegs, labels, size, start = fn.external_source(
        source, num_outputs=4, batch=True, cycle="raise", dtype=[types.UINT8, types.INT64, types.FLOAT, types.INT32])
    images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB,
                               adjust_orientation=False, jpeg_fancy_upsampling=True)
    images = fn.resize(images, size=size, interp_type=INTERPOLATIONS[interpolation], antialias=True)
    images = fn.slice(images, start=start, shape=[img_size, img_size], axis_names="WH")
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW",
                                      mean=[255 * m for m in mean], std=[255 * s for s in std])
    return images, labels


# --------------------------------------------------------------------------------------------- loaders


def pipeline_args(device: torch.device, num_workers: int) -> dict:
    """DALI's device and threads: the training GPU, or DALI's CPU mode (``device_id=None``) without one."""
    gpu = device.type == "cuda"
    index = (torch.cuda.current_device() if device.index is None else device.index) if gpu else None
    return dict(device_id=index, num_threads=max(1, num_workers), gpu=gpu)


class _Epochs:
    """Runs a pipeline one pass of its source per `epoch` call; the pipeline is built once, on first use, and
    reset for the next pass when the previous one ran to its end and ``reusable(source, pass)`` (otherwise,
    e.g. after a pass was left half-way, what it prefetched is dropped with it and a new one is built). An
    image that cannot be read or decoded is one `ImageError` naming it (the source's ``undecodable``: DALI
    names no file, and a worker's error reaches this process as a RuntimeError holding only its message).

    The pipeline is run by a feeding thread (`Feeder`), so receiving the source's batches, feeding them to DALI
    and scheduling its runs cost the training thread nothing; ``feeder_cpu_s`` adds up that thread's CPU time."""

    def __init__(self, make_source: Callable, make_pipeline: Callable, device_index: int | None,
                 reusable: Callable = lambda source, i: True):
        self.make_source, self.make_pipeline, self.reusable = make_source, make_pipeline, reusable
        self.device_index, self.feeder = device_index, None
        self.source, self.iterator, self.finished, self.pass_idx = None, None, False, 0
        self.feeder_cpu_s = 0.0

    def epoch(self):
        if self.feeder is not None:
            self.feeder.stop()               # a pass left half-way: its thread ends before anything is reused
        reuse = self.iterator is not None and self.finished and self.reusable(self.source, self.pass_idx + 1)
        self.finished = False
        self.feeder = Feeder(self._pass(reuse), self.device_index, self)
        return self.feeder

    def close(self):
        """End the feeding thread and drop the pipeline (and its workers) now."""
        if self.feeder is not None:
            self.feeder.stop()
        self.feeder = self.iterator = self.source = None

    def _pass(self, reuse: bool):
        """The next pass, on the feeding thread: the pipeline reset for it (``reuse``) or built anew."""
        if reuse:
            self.iterator.reset()
            self.pass_idx += 1
        else:
            self.source, self.pass_idx = self.make_source(), 0
            pipe = self.make_pipeline(self.source)
            pipe.build()
            self.iterator = DALIGenericIterator([pipe], ["images", "labels"], prepare_first_batch=False,
                                                last_batch_policy=LastBatchPolicy.PARTIAL)
        done = 0
        try:
            for out in self.iterator:
                yield out[0]["images"], out[0]["labels"]
                done += 1
        except (EvitError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - DALI's decoder, or a worker's error (which comes back a RuntimeError)
            raise self.source.undecodable(e, self.pass_idx, done) from e
        self.finished = True


class Feeder:
    """Iterates ``batches`` on a daemon thread, one batch ahead of the thread iterating the `Feeder` (the
    training thread), which receives them, or the exception that ended them, in order. It holds no batch it has
    handed over, so the training thread frees each when it is done with it. `stop` ends the thread after the
    batch it is taking. The thread's CPU time is added to ``counter.feeder_cpu_s``.
    On a GPU the thread uses ``device_index``; DALI's batches come on the default stream, as the training
    step's kernels do."""

    def __init__(self, batches: Iterator, device_index: int | None, counter):
        self.queue, self.stopped, self.ended = queue.Queue(maxsize=1), threading.Event(), False
        self.thread = threading.Thread(target=_feed, args=(batches, self.queue, self.stopped, device_index, counter),
                                       name="evit-dali-feed", daemon=True)
        self.thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        if self.ended:
            raise StopIteration
        batch, error = self.queue.get()
        if error is not None or batch is _END:
            self.stop()
            if error is not None:
                raise error
            raise StopIteration
        return batch

    def stop(self):
        self.ended = True
        self.stopped.set()
        self.thread.join()


_END = object()


def _feed(batches: Iterator, out: queue.Queue, stopped: threading.Event, device_index: int | None, counter):
    """`Feeder`'s thread: puts ``(batch, None)`` for each batch, then ``(_END, None)`` or ``(_END, error)``."""
    def put(item) -> bool:
        while not stopped.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    if device_index is not None:
        torch.cuda.set_device(device_index)
    cpu = time.thread_time()
    try:
        for batch in batches:
            now = time.thread_time()
            counter.feeder_cpu_s, cpu = counter.feeder_cpu_s + now - cpu, now
            if not put((batch, None)):
                return
        put((_END, None))
    except BaseException as e:  # noqa: BLE001 - raised again on the iterating thread
        put((_END, e))
    finally:
        counter.feeder_cpu_s += time.thread_time() - cpu


class DaliTrainLoader:
    """Training batches ``(uint8 images (N, 3, S, S) on the device, int64 labels)`` from DALI.

    Each iteration is one pass of ``batch_sampler`` (a `BatchSampler` over `TrainSampler`, at the epoch and
    start set when the iteration begins). The pipeline and its workers are kept for the next pass when the
    sampler is then set to the next epoch from its start (`TrainBatches.follows`), else built anew.
    """

    def __init__(self, cfg: dict, dataset, batch_sampler, device: torch.device):
        m, d, t = cfg["model"], cfg["data"], cfg["train"]
        if t["augment"] != "deit":
            raise ConfigError(f"train.augment: data.loader dali trains with the deit augment, not {t['augment']!r} "
                              "(it evaluates any run); use data.loader: torch")
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.spec = RandAugmentSpec(t["aa"]) if t["aa"] else None
        self.kwargs = dict(
            img_size=m["img_size"], interpolation=t["interpolation"], names=self.spec.names if self.spec else [],
            fill=[min(255, round(255 * x)) for x in d["mean"]],
            num_layers=self.spec.num_layers if self.spec else 0, batch_size=batch_sampler.batch_size,
            prefetch_queue_depth=PREFETCH_DEPTH, **pipeline_args(device, d["num_workers"]))
        self.num_threads = self.kwargs["num_threads"]
        self.epochs = _Epochs(
            lambda: TrainBatches(self.dataset, batch_sampler.sampler, batch_sampler.batch_size, self.spec),
            lambda source: train_pipeline(source=source, parallel=True, py_num_workers=self.num_threads,
                                          py_start_method="spawn", **self.kwargs),
            self.kwargs["device_id"], lambda source, pass_idx: source.follows(batch_sampler.sampler, pass_idx))

    def __len__(self) -> int:
        return len(self.batch_sampler)

    @property
    def feeder_cpu_s(self) -> float:
        """The CPU time its feeding threads have spent so far (`Feeder`)."""
        return self.epochs.feeder_cpu_s

    def close(self):
        self.epochs.close()

    def __iter__(self):
        return self.epochs.epoch()


class DaliEvalLoader:
    """Evaluation batches ``(normalized float images (N, 3, S, S), int64 labels)``: rank ``rank``'s share
    of ``dataset`` as `ShardSampler` splits it."""

    def __init__(self, cfg: dict, dataset, rank: int, world_size: int, device: torch.device):
        m, d, ev, t = cfg["model"], cfg["data"], cfg["eval"], cfg["train"]
        self.dataset, self.batch = dataset, ev["batch_size"]
        self.indices = list(ShardSampler(len(dataset), world_size, rank))
        self.img_size, self.crop_pct = m["img_size"], ev["crop_pct"]
        interpolation = t["interpolation"] if t["interpolation"] != "random" else "bicubic"
        self.kwargs = dict(img_size=m["img_size"], interpolation=interpolation, mean=d["mean"], std=d["std"],
                           batch_size=self.batch, prefetch_queue_depth=PREFETCH_DEPTH,
                           **pipeline_args(device, d["num_workers"]))
        self.epochs = _Epochs(lambda: EvalSource(self.dataset, self.indices, self.batch, self.img_size,
                                                 self.crop_pct, self.kwargs["num_threads"]),
                              lambda source: eval_pipeline(source=source, **self.kwargs), self.kwargs["device_id"])

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch)

    def close(self):
        self.epochs.close()

    def __iter__(self):
        return self.epochs.epoch()
