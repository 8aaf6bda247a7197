"""`clipn train`: teach a CLIP to say no on (image, caption) pairs."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .common import DeviceOpt, check_device, check_output, fail, handle_errors, info, stderr, warn

if TYPE_CHECKING:
    from ..training.trainer import Silent, StepLog

Opt = typer.Option


def train(
    base: Annotated[str, Opt("--base", help="open_clip model name (with --pretrained), a plain CLIP checkpoint (.pt/.bin/.safetensors), or a CLIPN to continue (a file or a name from 'clipn weights list', e.g. digits).", show_default=False)],
    data: Annotated[str, Opt("--data", help="CSV/TSV/JSONL of (image, caption), a folder of images with same-named .txt captions, or tar shards ('cc3m-{00000..00331}.tar').", show_default=False)],
    output: Annotated[Path, Opt("--output", "-o", help="Output CLIPN .safetensors (loads in 'clipn detect' as is).", show_default=False)],
    pretrained: Annotated[str | None, Opt("--pretrained", help="open_clip pretrained tag for a model-name BASE, e.g. laion2b_s34b_b88k (downloaded; needs network).", show_default=False)] = None,
    config: Annotated[str | None, Opt("--config", help="Model config (open_clip name or JSON) of a checkpoint BASE. Default: recognised from tensor shapes.", show_default=False)] = None,
    steps: Annotated[int | None, Opt("--steps", min=1, help="Optimiser steps (overrides --epochs).", show_default=False)] = None,
    epochs: Annotated[float, Opt("--epochs", min=0.0, help="Passes over the data (official: 10).")] = 10.0,
    samples_per_epoch: Annotated[int | None, Opt("--samples-per-epoch", min=1, help="Samples in the shards (their length is not known in advance).", show_default=False)] = None,
    batch_size: Annotated[int, Opt("--batch-size", "-b", min=2, help="Samples per step and process (official: 512 × 4 GPUs).")] = 512,
    lr: Annotated[float, Opt("--lr", min=0.0, help="Peak learning rate (AdamW, cosine schedule).")] = 3e-4,
    weight_decay: Annotated[float, Opt("--weight-decay", min=0.0, help="AdamW weight decay (none on gains, biases, 1-D tensors).")] = 0.2,
    warmup: Annotated[int, Opt("--warmup", min=0, help="Linear warm-up steps.")] = 0,
    seed: Annotated[int, Opt("--seed", help="Seed of data order and prompt sampling.")] = 0,
    num_prompts: Annotated[int | None, Opt("--num-prompts", min=1, help="Learnable 'no' prompts for a new CLIPN (official: 16).", show_default=False)] = None,
    exclude_same_caption: Annotated[bool | None, Opt("--exclude-same-caption/--include-same-caption", help="Leave pairs with identical captions out of L_no (default) or count them as negatives (the official loss).", show_default=False)] = None,
    cache_features: Annotated[bool | None, Opt("--cache-features/--no-cache-features", help="Encode frozen image/text features once. Default: on for index files and folders without --augment.", show_default=False)] = None,
    augment: Annotated[bool, Opt("--augment", help="Official random resized crop (scale 0.9-1) instead of the eval transform; encodes images every step.")] = False,
    image_key: Annotated[str | None, Opt("--image-key", help="Image column of a CSV/TSV/JSONL index.", show_default=False)] = None,
    caption_key: Annotated[str | None, Opt("--caption-key", help="Caption column of a CSV/TSV/JSONL index.", show_default=False)] = None,
    shuffle_buffer: Annotated[int, Opt("--shuffle-buffer", min=0, help="Samples in the shuffle buffer of a shard stream.")] = 1000,
    device: DeviceOpt = "auto",
    precision: Annotated[str, Opt("--precision", help="auto (amp on CUDA, else fp32), fp32, amp or bf16.")] = "auto",
    workers: Annotated[int, Opt("--workers", "-j", min=0, help="Image decoding threads.")] = 4,
    checkpoint_every: Annotated[int, Opt("--checkpoint-every", min=0, help="Save a resumable checkpoint every N steps (0: never).")] = 0,
    checkpoint: Annotated[Path | None, Opt("--checkpoint", help="Checkpoint file. Default: OUTPUT.ckpt.", show_default=False)] = None,
    resume: Annotated[Path | None, Opt("--resume", help="Continue an interrupted run from its checkpoint (same options).", show_default=False)] = None,
    vocabulary: Annotated[str | None, Opt("--vocabulary", help="Comma-separated class names, when the base knows no others (a CLIP trained on a closed set): recorded in the output, and clipn warns when asked about other classes. Default: a CLIPN base's own.", show_default=False)] = None,
) -> None:
    """Train the "no" text tower of a CLIP on (image, caption) pairs (CLIPN losses, official settings).

    Only the "no" tower learns; the image tower, standard text tower and logit scale stay frozen.
    Multi-GPU: torchrun --nproc_per_node N -m clipn_cli train ... (features are gathered across GPUs).
    """
    with handle_errors():
        if output.suffix != ".safetensors":
            fail(f"--output {output}: the output must be a .safetensors file")
        check_output("--output", output)
        check_output("--checkpoint", checkpoint)
        if resume is not None and not resume.exists():
            fail(f"--resume {resume}: no such checkpoint")
        check_device(device)
        if not (os.path.exists(data) or "://" in data or set("{*?[") & set(data)):
            fail(f"--data {data}: no such file or folder")
        base = _named_base(base, pretrained)
        from ..training import TrainConfig, load_base, open_data
        from ..training import train as run_train

        known = None
        if vocabulary is not None:
            known = tuple(dict.fromkeys(n.strip() for n in vocabulary.split(",") if n.strip()))
            if not known:
                fail("--vocabulary: no class names given")
        main_process = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
        source = open_data(data, image_key, caption_key, shuffle_buffer)
        if source.skipped and main_process:
            warn(f"skipped {len(source.skipped)} sample(s), first: {source.skipped[0]}")
        start = load_base(base, pretrained, config, num_prompts)
        options = {} if exclude_same_caption is None else {"exclude_same_caption": exclude_same_caption}
        settings = TrainConfig(
            output=output, steps=steps, epochs=epochs, samples_per_epoch=samples_per_epoch, batch_size=batch_size,
            lr=lr, weight_decay=weight_decay, warmup=warmup, seed=seed,
            cache_features=cache_features, augment=augment, device=device, precision=precision, workers=workers,
            checkpoint_every=checkpoint_every, checkpoint=checkpoint, resume=resume, vocabulary=known, **options,
        )
        with _monitor(main_process) as monitor:
            result = run_train(start, source, settings, monitor)
        if result.info is None:
            return
        new_skips = result.skipped[len(source.skipped):]
        if new_skips:
            warn(f"{len(new_skips)} image(s) could not be read and were left out, first: {new_skips[0]}")
        last = getattr(monitor, "last", None)  # the last step logged: the summary repeats its numbers
        shown = last.losses if last is not None else result.losses
        losses = " ".join(f"{k} {v:.4f}" for k, v in shown.items())
        size_mb = output.stat().st_size / 1e6
        label = f"losses at step {last.step}" if last is not None else "last losses"
        info(f"wrote {output} ({size_mb:.1f} MB, {result.steps} steps in {result.seconds:.1f} s; {label}: {losses})")


def _named_base(base: str, pretrained: str | None) -> str:
    """A weights name ('digits', 'vitb16', one from 'clipn weights add') means its file, as for --weights;
    an open_clip model name (with --pretrained) or a path stays as given."""
    if pretrained is not None or os.path.exists(base):
        return base
    from ..weights.home import resolve_weights

    return str(resolve_weights(base))


class _LogMonitor:
    """Plain lines on stderr (pipelines, CI): about 20 per run."""

    def __init__(self) -> None:
        self.total = 0
        self.last: StepLog | None = None

    def phase(self, name: str, total: int | None) -> None:
        self.total = total or 0
        info(f"{name}" + (f" ({total})" if total else ""))

    def advance(self, n: int) -> None:
        pass

    def step(self, log: StepLog) -> None:
        every = max(1, log.total // 20)
        if log.step % every == 0 or log.step == log.total:
            self.last = log
            info(f"step {log.step}/{log.total} {_losses(log)}")


class _RichMonitor:
    """A live progress line with the loss terms, on a terminal."""

    def __init__(self, progress) -> None:
        self.progress, self.task = progress, None
        self.last: StepLog | None = None

    def phase(self, name: str, total: int | None) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(name, total=total, losses="")

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)

    def step(self, log: StepLog) -> None:
        self.last = log
        self.progress.update(self.task, completed=log.step, losses=_losses(log))


def _losses(log: StepLog) -> str:
    parts = " ".join(f"{k} {v:.4f}" for k, v in log.losses.items())
    return f"{parts} lr {log.lr:.2e} {log.samples_per_second:.0f} samples/s"


@contextlib.contextmanager
def _monitor(main_process: bool) -> Iterator[Silent | _LogMonitor | _RichMonitor]:
    if not main_process:
        from ..training.trainer import Silent

        yield Silent()
        return
    if not sys.stderr.isatty():
        yield _LogMonitor()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"))
    with Progress(*columns, console=stderr) as progress:
        yield _RichMonitor(progress)
