"""`clipn convert`: official checkpoint → safetensors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import check_file, check_output, fail, handle_errors, info


def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Official CLIPN checkpoint (.pt, e.g. epoch_10.pt) or a bare state dict.")],
    output: Annotated[Path, typer.Argument(help="Output .safetensors file (written atomically).")],
    config: Annotated[
        str | None,
        typer.Option("--config", help="open_clip model name (ViT-B-16) or model-config JSON. Default: recognised from tensor shapes.", show_default=False),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Stored precision: fp32, fp16, bf16 or int16 (fixed point, per-row scales); always computed in fp32.")] = "fp32",
) -> None:
    """Convert an official CLIPN checkpoint to clipn's safetensors format (checked strictly, optimizer dropped).

    Checkpoints are read with torch.load(weights_only=True): a file that would run code is refused.
    """
    with handle_errors():
        check_file("CHECKPOINT", checkpoint)
        check_output("OUTPUT", output)
        from ..weights.checkpoints import convert_checkpoint

        if output.exists() and checkpoint.exists() and output.samefile(checkpoint):
            fail(f"{output}: the output would overwrite the checkpoint being converted")
        result = convert_checkpoint(checkpoint, output, config=config, dtype=dtype)
        size_mb = output.stat().st_size / 1e6
        info(
            f"wrote {output} ({size_mb:.1f} MB, {result.model_name}, {result.num_prompts} prompts, "
            f"{dtype}, fingerprint {result.fingerprint[:12]})"
        )
