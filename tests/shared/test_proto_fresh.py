"""The committed generated modules match what `make proto` produces from tunnel.proto."""

from pathlib import Path

from fieldline.shared.proto import codegen


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    codegen.generate(tmp_path)
    for name in codegen.GENERATED:
        committed = (codegen.PROTO_DIR / name).read_text()
        fresh = (tmp_path / name).read_text()
        assert committed == fresh, f"{name} is stale: run `make proto` and commit the result"
