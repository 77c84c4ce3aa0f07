"""A newcomer's common mistakes end in one line `error: ...` that says what to run next, exit code 2, no traceback;
every option has a description; off a terminal, long steps log progress lines with rate and ETA."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from typer.testing import CliRunner

from prodcat.cli import app
from prodcat.errors import describe, did_you_mean
from train_fixtures import STORE, make_workdir

REPO = Path(__file__).resolve().parents[1]


def one_line_error(args: list[str], *fragments: str) -> str:
    """Run the CLI; assert exit 2, exactly one stderr line starting `error:` (nothing else), no traceback."""
    result = CliRunner().invoke(app, [str(arg) for arg in args])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


@pytest.fixture
def ingested(tiny_data_dir: Path, tmp_path: Path) -> Path:
    workdir = tmp_path / "work"
    result = CliRunner().invoke(app, ["ingest", str(tiny_data_dir), "-w", str(workdir), "--val-fraction", "0.25"])
    assert result.exit_code == 0, result.output
    return workdir


@pytest.fixture
def fake_run(tmp_path: Path) -> Path:
    """A folder that looks like a run (checkpoints/) but has none: enough for checks made before loading."""
    run = tmp_path / "w" / "runs" / "linear-softmax-s0"
    (run / "checkpoints").mkdir(parents=True)
    return run


@pytest.mark.parametrize("command", ["train", "extract", "explore", "compare", "sweep", "ocr"])
def test_an_empty_workdir_points_at_ingest(tmp_path: Path, command: str) -> None:
    for workdir in (tmp_path / "missing", tmp_path):
        one_line_error([command, "--workdir", workdir], "prodcat ingest", str(workdir))


@pytest.mark.parametrize(
    ("option", "value", "hint"),
    [
        ("--loss", "sampeld", "did you mean sampled?"),
        ("--head", "linaer", "did you mean linear?"),
        ("--optimizer", "adamww", "did you mean adamw?"),
        ("--sampler", "loguniform", "did you mean log_uniform?"),
    ],
)
def test_a_misspelt_choice_lists_the_choices_and_the_closest(tmp_path: Path, option: str, value: str, hint: str):
    line = one_line_error(["train", "-w", tmp_path, option, value], hint, repr(value))
    if option == "--head":
        assert "hier" in line and "conv" in line


def test_a_misspelt_loss_fails_before_torch_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\nfrom prodcat.cli import main\nsys.argv = ['prodcat', 'train', '-w', sys.argv[1], '--loss', 'x']\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    print(exit.code, 'torch' in sys.modules)\n"
    )
    env = {"PYTHONPATH": str(REPO / "src")}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env)
    assert result.stdout.split() == ["2", "False"], (result.stdout, result.stderr)
    assert result.stderr.startswith("error: loss must be one of")


def test_a_misspelt_backbone_suggests_the_registered_name(ingested: Path) -> None:
    one_line_error(["extract", "-w", ingested, "--backbone", "efficientnet-lite0"], "did you mean efficientnet_lite0?")


def test_features_naming_no_store_lists_the_stores(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=40)
    one_line_error(["train", "-w", tmp_path, "--features", "toyy"], "did you mean toy?", f"known: {STORE}")
    one_line_error(["compare", "-w", tmp_path, "--features", "nope"], f"known: {STORE}")


def test_features_before_any_extraction_points_at_extract(ingested: Path) -> None:
    one_line_error(["train", "-w", ingested], "prodcat extract --workdir")


@pytest.mark.parametrize("command", ["serve", "evaluate", "predict"])
def test_a_missing_run_folder(tmp_path: Path, fake_run: Path, command: str) -> None:
    extra = ["--bson", tmp_path / "test.bson"] if command == "predict" else []
    one_line_error([command, "--run", tmp_path / "nowhere", *extra], "no such run folder", "prodcat train")
    # Beside other runs: they are listed, the closest suggested.
    one_line_error([command, "--run", fake_run.parent / "linear-softmax-s1", *extra], "did you mean linear-softmax-s0")


def test_predict_bson_missing_or_a_folder(tmp_path: Path, fake_run: Path) -> None:
    one_line_error(["predict", "--run", fake_run, "--bson", tmp_path], "is a folder", "test.bson")
    one_line_error(["predict", "--run", fake_run, "--bson", tmp_path / "test.bson"], "no such file")


def test_a_corrupt_checkpoint_is_one_line(tmp_path: Path) -> None:
    from prodcat.train.loop import train
    from train_fixtures import tiny_config

    make_workdir(tmp_path, rows=60)
    run = train(tiny_config(tmp_path, epochs=1))
    for weights in (run / "checkpoints").glob("*.safetensors"):
        weights.write_bytes(b"not a checkpoint")
    bson = tmp_path / "test.bson"
    bson.write_bytes(b"")
    one_line_error(["predict", "--run", run, "--bson", bson, "--out", tmp_path / "s.csv"], "checkpoint")


def test_extract_skips_splits_the_catalog_lacks(tiny_data_dir: Path, tmp_path: Path, caplog) -> None:
    from prodcat.config import ExtractConfig
    from prodcat.errors import UserError
    from prodcat.features.extract import check_inputs

    (tiny_data_dir / "test.bson").unlink()
    workdir = tmp_path / "work"
    assert CliRunner().invoke(app, ["ingest", str(tiny_data_dir), "-w", str(workdir)]).exit_code == 0
    config = ExtractConfig(workdir=str(workdir), splits=("train", "val", "holdout", "test"))
    with caplog.at_level("INFO", logger="prodcat"):
        kept = check_inputs(config)
    assert kept.splits == ("train", "val", "holdout")
    assert "skipping split(s) test" in caplog.text
    with pytest.raises(UserError, match="none of the splits test"):
        check_inputs(ExtractConfig(workdir=str(workdir), splits=("test",)))


@pytest.mark.parametrize(
    ("code", "fragment"),
    [
        (errno.ENOSPC, "no space left"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_disk_full_and_read_only_workdirs(monkeypatch, tiny_data_dir: Path, tmp_path: Path, code, fragment) -> None:
    import prodcat.data.catalog as catalog

    where = str(tmp_path / "work" / "catalog" / "train.parquet")

    def failing(config):
        raise OSError(code, os.strerror(code), where)

    monkeypatch.setattr(catalog, "ingest", failing)
    one_line_error(["ingest", tiny_data_dir, "-w", tmp_path / "work"], fragment, "--workdir")


def test_ingest_on_a_read_only_workdir_says_what_to_do(monkeypatch, tiny_data_dir: Path, tmp_path: Path) -> None:
    import prodcat.data.catalog as catalog

    def read_only(out, *args):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(out.root / "taxonomy.parquet"))

    monkeypatch.setattr(catalog, "_write_outputs", read_only)
    one_line_error(["ingest", tiny_data_dir, "-w", tmp_path / "work"], "Read-only file system", "--workdir you can")


def test_serve_on_a_taken_port(fake_run: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(["serve", "--run", fake_run, "--port", port], f"127.0.0.1:{port}", "another --port")
    assert "serving" not in line


def test_did_you_mean_and_describe() -> None:
    assert did_you_mean("efficientnet_lite", ["efficientnet_lite0", "legacy_xception"]) == (
        " (did you mean efficientnet_lite0?)"
    )
    assert did_you_mean("zzz", ["linear", "mlp"]) == ""
    assert describe(RuntimeError("a bug")) is None  # bugs keep their traceback
    assert describe(OSError(errno.ENOSPC, "No space left on device", "/w/x")).startswith("no space left")
    assert describe(OSError("IOError: No space left on device")).startswith("no space left")  # pyarrow's kind
    assert describe(FileNotFoundError("W/x.parquet: no catalog; run ingest")) == "W/x.parquet: no catalog; run ingest"


def _parameters(command: click.Command, path: str = "prodcat"):
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from _parameters(sub, f"{path} {name}")
    for param in command.params:
        yield path, param


def test_every_option_has_a_description() -> None:
    missing = [
        f"{path} {param.opts[0]}"
        for path, param in _parameters(typer.main.get_command(app))
        if param.name != "help" and not (getattr(param, "help", None) or "").strip()
    ]
    assert not missing, missing


def test_progress_lines_off_a_terminal_and_the_log_file(tmp_path: Path) -> None:
    make_workdir(tmp_path, rows=200)
    command = [sys.executable, "-m", "prodcat", "train", "-w", str(tmp_path), "--features", STORE, "--epochs", "2"]
    command += ["--batch-size", "32", "--eval-every", "5", "--hidden-dim", "16", "--lr", "0.05"]
    env = {"PYTHONPATH": str(REPO / "src"), "PRODCAT_PROGRESS_EVERY": "0"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    progress = [line for line in result.stderr.splitlines() if "prodcat.progress" in line]
    assert any("ex/s" in line and "ETA" in line and "%)" in line for line in progress), result.stderr
    assert any(": done, " in line for line in progress), result.stderr
    assert any("linear-softmax-s0: val top-1 " in line for line in result.stderr.splitlines()), result.stderr
    log = (tmp_path / "logs" / "prodcat.log").read_text(encoding="utf-8")
    assert "ETA" in log and "val top-1" in log
