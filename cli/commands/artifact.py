"""`fieldline artifact`: upload models and files (quantized on the way if asked), list them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from fieldline.cli.admin_client import AdminClient
from fieldline.cli.commands.common import DEFAULT_URL, JsonOpt, KeyOpt, UrlOpt, admin
from fieldline.cli.output import console, fail, print_json, print_table

artifact_app = typer.Typer(no_args_is_help=True, help="Artifacts (models, files).")


@artifact_app.command("push")
def artifact_push(
    path: Annotated[
        Path, typer.Argument(help="The file to upload (--kind llm: a checkpoint directory).")
    ],
    name: Annotated[str, typer.Option(help="Artifact name.")],
    version: Annotated[str, typer.Option(help="Artifact version.")],
    kind: Annotated[str, typer.Option(help="onnx, llm or file.")] = "file",
    quantize: Annotated[
        str | None,
        typer.Option(
            help="int8: onnx: the cloud makes and keeps an INT8 version; "
            "llm: int8 weight-only, made here before the upload."
        ),
    ] = None,
    calibration: Annotated[
        Path | None, typer.Option(help=".npz of calibration inputs for static INT8 (onnx).")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload an artifact; the cloud stores it by sha256 and signs its manifest.

    With --quantize int8 the file is kept as VERSION-fp32 and the cloud's INT8 version becomes
    VERSION, the one to assign. With --kind llm, PATH is a Hugging Face checkpoint directory,
    packed as one tar (int8 weight-only first with --quantize int8).
    """
    if kind == "llm":
        _push_llm(path, name, version, quantize, url, key, as_json)
        return
    if not path.is_file():
        raise fail(f"{path} is not a file", 2)
    if quantize not in (None, "int8"):
        raise fail(f"--quantize takes int8, not {quantize!r}", 2)
    if calibration is not None and quantize is None:
        raise fail("--calibration only makes sense with --quantize int8", 2)
    if calibration is not None and not calibration.is_file():
        raise fail(f"{calibration} is not a file", 2)
    with admin(url, key) as c:
        if quantize is None:
            manifest = _upload(c, path, name, version, kind, quiet=as_json)
        else:
            if kind != "onnx":
                raise fail("--quantize int8 applies to --kind onnx (LLMs: see docs)", 2)
            fp32 = _upload(c, path, name, f"{version}-fp32", kind, quiet=as_json)
            calib_ref = None
            if calibration is not None:
                cal = _upload(c, calibration, f"{name}-calibration", version, "file", quiet=as_json)
                calib_ref = f"{cal['name']}@{cal['version']}"
            if not as_json:
                console.print(f"quantizing {fp32['name']}@{fp32['version']} to INT8 in the cloud…")
            manifest = c.quantize(
                name, fp32["version"], target_version=version, calibration=calib_ref
            )
    if as_json:
        print_json(manifest)
        return
    console.print(
        f"pushed {manifest['name']}@{manifest['version']} "
        f"({manifest['size']} bytes, sha256 {manifest['sha256'][:12]}…)"
    )
    report = (manifest.get("metadata") or {}).get("quantization")
    if report:
        console.print(
            f"INT8: {report['int8_bytes']} bytes vs {report['fp32_bytes']} fp32; "
            f"batch-8 latency {report['int8_latency_ms'].get('8')} ms vs "
            f"{report['fp32_latency_ms'].get('8')} ms; agreement {report['agreement']}"
        )


def _push_llm(
    path: Path,
    name: str,
    version: str,
    quantize: str | None,
    url: str,
    key: str | None,
    as_json: bool,
) -> None:
    import tempfile

    from fieldline.cli.llm_pack import pack_llm
    from fieldline.edge.engine.loader import CheckpointError
    from fieldline.shared.llm_artifact import LLMArtifactError

    if quantize not in (None, "int8"):
        raise fail(f"--quantize takes int8, not {quantize!r}", 2)
    with tempfile.TemporaryDirectory(prefix="fieldline-llm-") as tmp:
        if not as_json:
            what = "quantizing to int8 and packing" if quantize else "packing"
            console.print(f"{what} {path}…")
        try:
            packed = pack_llm(path, Path(tmp), quantize=quantize)
        except (LLMArtifactError, CheckpointError) as exc:
            raise fail(str(exc), 2) from exc
        with admin(url, key) as c:
            manifest = _upload(
                c,
                packed.tar,
                name,
                version,
                "llm",
                quiet=as_json,
                metadata=packed.metadata,
                quantization=packed.quantization,
            )
    if as_json:
        print_json(manifest)
        return
    console.print(
        f"pushed {manifest['name']}@{manifest['version']} (llm, {manifest['size']} bytes, "
        f"sha256 {manifest['sha256'][:12]}…)"
    )
    q = packed.metadata.get("quantization") or {}
    if "bytes_after" in q:
        console.print(
            f"int8 weight-only: {q['bytes_after']} bytes of weights vs {q['bytes_before']}"
        )


def _upload(
    c: AdminClient,
    path: Path,
    name: str,
    version: str,
    kind: str,
    *,
    quiet: bool,
    metadata: dict[str, Any] | None = None,
    quantization: str | None = None,
) -> dict[str, Any]:
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=console,
        transient=True,
        disable=quiet,
    ) as progress:
        task = progress.add_task(f"upload {path.name}", total=path.stat().st_size)
        return c.push_artifact(
            path,
            name=name,
            version=version,
            kind=kind,
            metadata=metadata,
            quantization=quantization,
            on_progress=lambda n: progress.advance(task, n),
        )


@artifact_app.command("list")
def artifact_list(url: UrlOpt = DEFAULT_URL, key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """List artifacts."""
    with admin(url, key) as c:
        rows = c.list_artifacts()
    if as_json:
        print_json(rows)
        return
    print_table(
        rows,
        [
            ("name", "name"),
            ("version", "version"),
            ("kind", "kind"),
            ("size", "size"),
            ("sha256", "sha256"),
            ("created", "created"),
        ],
        title="artifacts",
    )
