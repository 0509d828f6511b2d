"""`fieldline engine`: try the LLM engine on a local checkpoint, and quantize one to int8."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fieldline.cli.output import console, fail

engine_app = typer.Typer(no_args_is_help=True, help="The edge LLM engine.")


@engine_app.command("generate")
def generate(
    model: Annotated[Path, typer.Option(help="Hugging Face checkpoint directory.")],
    prompt: Annotated[str, typer.Option(help="Prompt text (token ids: comma-separated).")],
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 for greedy.")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
) -> None:
    """Generate from a prompt and print the text (or the token ids without a tokenizer)."""
    from fieldline.edge.engine.config import EngineConfig
    from fieldline.edge.engine.engine import LLMEngine
    from fieldline.edge.engine.loader import CheckpointError
    from fieldline.edge.engine.sequence import SamplingParams
    from fieldline.shared.logs import configure_logging

    configure_logging("warning")  # stdout carries only the generated text
    try:
        engine = LLMEngine(EngineConfig(model=str(model)))
    except (CheckpointError, ValueError) as exc:
        raise fail(str(exc), 2) from exc
    params = SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens)
    text_or_ids: str | list[int] = prompt
    if engine.tokenizer is None:
        try:
            text_or_ids = [int(t) for t in prompt.split(",")]
        except ValueError:
            raise fail(f"{model} has no tokenizer.json: give the prompt as token ids", 2) from None
    out = engine.generate([text_or_ids], params)[0]  # type: ignore[list-item]
    console.print(out.text if out.text is not None else out.output_token_ids)


@engine_app.command("quantize")
def quantize(
    src: Annotated[Path, typer.Argument(help="Checkpoint directory.")],
    dst: Annotated[Path, typer.Argument(help="Where the int8 checkpoint goes.")],
) -> None:
    """Write an int8 weight-only copy of a checkpoint (per-output-channel scales)."""
    from fieldline.edge.engine.loader import CheckpointError
    from fieldline.edge.engine.quantize import quantize_checkpoint

    try:
        sizes = quantize_checkpoint(src, dst)
    except CheckpointError as exc:
        raise fail(str(exc), 2) from exc
    console.print(
        f"int8 checkpoint in {dst}: {sizes['bytes_after']} bytes (was {sizes['bytes_before']})"
    )
