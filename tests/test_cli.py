"""The typer CLI: every command is listed, and `ingest` reports or fails clearly."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from prodcat.cli import app

# Derived from the app, so a new command cannot be forgotten here; the pipeline's core steps must be among them.
COMMANDS = tuple(command.name or command.callback.__name__.replace("_", "-") for command in app.registered_commands)
CORE = ("demo-data", "ingest", "explore", "extract", "train", "evaluate", "predict", "report", "serve", "demo")


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    # First word of each line, with or without rich's box drawing around it.
    listed = {line.strip(" │").split()[0] for line in result.output.splitlines() if line.strip(" │")}
    assert set(COMMANDS) <= listed, result.output
    assert set(CORE) <= set(COMMANDS)
    assert "Steps, in order" in result.output
    for command in COMMANDS:
        sub = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
        assert sub.exit_code == 0, (command, sub.output)


def test_version():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"prodcat {version('prodcat')}"


def test_ingest_command(tiny_data_dir, tmp_path):
    workdir = tmp_path / "work"
    result = CliRunner().invoke(
        app, ["ingest", str(tiny_data_dir), "--workdir", str(workdir), "--val-fraction", "0.25", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "train: 12 products, 30 images, 0 problems" in result.output
    assert "test: 3 products, 6 images, 0 problems" in result.output
    config = json.loads((workdir / "catalog" / "config.json").read_text())
    assert (config["val_fraction"], config["seed"], config["strict"]) == (0.25, 3, False)


def damage(data_dir) -> int:
    """Corrupt the third train document's first element type; returns its offset."""
    path = data_dir / "train.bson"
    data = bytearray(path.read_bytes())
    offset = 0
    for _ in range(2):
        offset += int.from_bytes(data[offset : offset + 4], "little")
    data[offset + 4] = 0xEE
    path.write_bytes(bytes(data))
    return offset


def test_ingest_reports_damage(tiny_data_dir, tmp_path):
    offset = damage(tiny_data_dir)
    result = CliRunner().invoke(app, ["ingest", str(tiny_data_dir), "-w", str(tmp_path / "work")])
    assert result.exit_code == 0, result.output
    assert "train: 11 products" in result.output and "1 problems" in result.output
    report = json.loads((tmp_path / "work" / "catalog" / "ingest_report.json").read_text())
    assert [(p["kind"], p["offset"]) for p in report["problems"]] == [("decode_error", offset)]


def test_strict_ingest_fails_naming_file_and_offset(tiny_data_dir, tmp_path):
    offset = damage(tiny_data_dir)
    result = CliRunner().invoke(app, ["ingest", str(tiny_data_dir), "-w", str(tmp_path / "work"), "--strict"])
    assert result.exit_code != 0
    assert "strict mode" in result.stderr
    assert str((tiny_data_dir / "train.bson").resolve()) in result.stderr and f"at byte {offset}" in result.stderr
    assert not (tmp_path / "work" / "catalog" / "train.parquet").exists()


def test_ingest_bad_csv_fails_clearly(tiny_data_dir, tmp_path):
    (tiny_data_dir / "category_names.csv").write_text("category_id,name\n1,x\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["ingest", str(tiny_data_dir), "-w", str(tmp_path / "work")])
    assert result.exit_code != 0
    assert "category_names.csv" in result.stderr and "header must be" in result.stderr
