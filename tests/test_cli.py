"""The typer CLI: every command is listed, every config field is a flag with its help, and `ingest` reports or
fails clearly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from prodcat.cli import app
from prodcat.cli_options import config_classes, flags
from prodcat.config import CompareConfig, ExtractConfig, TrainConfig

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


def _name(info: typer.models.CommandInfo) -> str:
    return info.name or info.callback.__name__.replace("_", "-")


@pytest.mark.parametrize("info", app.registered_commands, ids=_name)
def test_help_lists_every_config_field_as_a_flag_with_its_help(info: typer.models.CommandInfo) -> None:
    name = _name(info)
    result = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "300"})  # rich reads the width from there
    assert result.exit_code == 0, result.output
    params = {param.name: param for param in typer.main.get_command(app).commands[name].params}
    for cls in config_classes(info.callback):
        for field in dataclasses.fields(cls):
            if not field.metadata.get("cli", True):  # config.record: a fact a stage writes, never a flag
                assert field.name not in params, (name, field.name)
                continue
            param = params[field.name]  # every field reachable: one option (or argument) each
            assert field.metadata["help"] and field.metadata["help"] in (param.help or ""), (name, field.name)
            assert field.metadata["help"].split()[0] in result.output, (name, field.name)
            if not field.metadata["positional"]:
                assert set(flags(field)) <= set(param.opts), (name, field.name, param.opts)
                assert flags(field)[0] in result.output, (name, field.name)


def test_the_stage_commands_take_every_field_of_their_config() -> None:
    configs = {_name(info): config_classes(info.callback) for info in app.registered_commands}
    assert configs["train"] == (TrainConfig,) and configs["extract"] == (ExtractConfig,)
    assert configs["compare"] == (CompareConfig,)
    derived = {"ingest", "explore", "evaluate", "predict", "serve", "sweep", "demo-data", "ocr", "text-head"}
    assert derived | {"rehearsal", "rehearsal-full"} <= {name for name, classes in configs.items() if classes}


def test_flags_build_the_config_with_defaults_from_the_dataclass(monkeypatch, tmp_path: Path) -> None:
    import prodcat.train.loop as loop

    seen = []
    monkeypatch.setattr(loop, "train", lambda config: seen.append(config) or tmp_path)
    args = ["train", "-w", tmp_path, "--features", "toy", "--hier-weights", "0.5, 0.5, 2", "--with-replacement"]
    args += ["--no-logq-correction", "--max-steps", "3", "--head", "hier", "--device", "cpu"]
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 0, result.output
    expected = TrainConfig(workdir=str(tmp_path), store="toy", hier_weights=(0.5, 0.5, 2.0), max_steps=3, head="hier",
                           sample_with_replacement=True, logq_correction=False, device="cpu")  # fmt: skip
    assert seen == [expected]


def test_extract_keeps_its_old_flag_names(monkeypatch, tmp_path: Path) -> None:
    import prodcat.cli as cli
    import prodcat.features.extract as extract

    seen = []
    monkeypatch.setattr(cli, "require_catalog", lambda workdir: None)
    monkeypatch.setattr(extract, "extract", lambda config: seen.append(config) or tmp_path)
    args = ["extract", "-w", str(tmp_path), "--split", "val,test", "--name", "mine", "--no-dedupe", "--random-init"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen == [ExtractConfig(workdir=str(tmp_path), splits=("val", "test"), store_name="mine", dedupe=False,
                                  random_init=True)]  # fmt: skip


def test_a_bad_list_value_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "-w", str(tmp_path), "--hier-weights", "a,b,c"])
    assert result.exit_code == 2 and "error: --hier-weights: 'a' is not a float" in result.stderr
    result = CliRunner().invoke(app, ["compare", "-w", str(tmp_path), "--arms", "softmax"])
    assert result.exit_code == 2 and "'softmax' needs 2 ':'-separated parts" in result.stderr


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
