"""Config checks: values that would otherwise be accepted silently end with a ConfigError naming the field."""

from __future__ import annotations

from typing import Any

import pytest

from prodcat.config import (
    CompareConfig,
    ConfigError,
    EvalConfig,
    ExploreConfig,
    ExtractConfig,
    IngestConfig,
    PredictConfig,
    SweepConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    save_config,
)

BAD_TRAIN = [
    dict(max_steps=-3),
    dict(max_steps=0),
    dict(warmup_steps=-10),
    dict(run_name="../.."),
    dict(run_name=".."),
    dict(run_name="."),
    dict(run_name="a/b"),
    dict(run_name="a\\b"),
    dict(run_name=""),
    dict(run_name="run name"),
    dict(store="../elsewhere"),
    dict(lr=0.0),
    dict(lr=-1e-3),
    dict(lr=float("nan")),
    dict(lr=float("inf")),
    dict(batch_size=0),
    dict(epochs=0),
    dict(epochs=-1, max_steps=10),
    dict(epochs=float("nan")),
    dict(eval_every=0),
    dict(seed=-1),
    dict(hidden_dim=0),
    dict(weight_decay=-0.1),
    dict(momentum=1.0),
    dict(unigram_alpha=-1.0),
    dict(hier_weights=(0.0, 0.0, 0.0)),
    dict(hier_weights=(1.0, float("nan"), 1.0)),
    dict(max_seconds=0.0),
    dict(memory_limit_gb=-1.0),
    dict(device="gpu"),
    dict(resume=True, overwrite=True),
    dict(stop_after=0),
    dict(num_sampled=0),
]


@pytest.mark.parametrize("overrides", BAD_TRAIN, ids=lambda o: ",".join(f"{k}={v!r}" for k, v in o.items()))
def test_train_config_refuses(overrides: dict[str, Any]) -> None:
    field = next(iter(overrides))
    with pytest.raises(ConfigError) as error:
        TrainConfig(**overrides)
    assert field in str(error.value) or (field == "resume" and "not both" in str(error.value))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(run_name="compare-softmax-s0"),
        dict(run_name="A.b_c-1"),
        dict(run_name="..hidden"),
        dict(max_steps=1, warmup_steps=0),
        dict(weight_decay=0.0, momentum=0.0),
        dict(device="cuda:1"),
        dict(resume=True),
        dict(overwrite=True),
        dict(memory_limit_gb=0.0),
    ],
)
def test_train_config_accepts(overrides: dict[str, Any]) -> None:
    TrainConfig(**overrides)


@pytest.mark.parametrize(
    ("cls", "overrides", "field"),
    [
        (ExtractConfig, dict(store_name="../../x"), "store_name"),
        (ExtractConfig, dict(store_name="a/b"), "store_name"),
        (ExtractConfig, dict(limit=0), "limit"),
        (ExtractConfig, dict(spatial_channels=0), "spatial_channels"),
        (ExploreConfig, dict(top_k=0), "top_k"),
        (IngestConfig, dict(seed=-1), "seed"),
        (EvalConfig, dict(batch_size=0), "batch_size"),
        (CompareConfig, dict(losses=("softmax", "sampeld")), "did you mean sampled"),
        (CompareConfig, dict(losses=(), arms=()), "at least one loss"),
        (CompareConfig, dict(seeds=0), "seeds"),
        (CompareConfig, dict(store="../x"), "store"),
        (SweepConfig, dict(num_sampled=()), "num_sampled"),
        (SweepConfig, dict(num_sampled=(8, 0)), "num_sampled"),
        (SweepConfig, dict(sampler="loguniform"), "sampler"),
        (PredictConfig, dict(batch_size=0), "batch_size"),
    ],
)
def test_other_configs_refuse(cls: type, overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        cls(**overrides)


def test_saved_configs_round_trip_and_are_checked_again_on_load(tmp_path) -> None:
    config = TrainConfig(run_name="x", overwrite=True, hier_weights=(0.5, 0.5, 1.0))
    assert load_config(TrainConfig, save_config(config, tmp_path / "config.json")) == config
    with pytest.raises(ConfigError, match="run_name"):
        config_from_dict(TrainConfig, {"run_name": "../x", "unknown_key": 1})


def test_older_config_files_are_read_under_the_new_field_names(tmp_path) -> None:
    # TrainConfig.store was `features` (a store name, not a feature kind); ExtractConfig.store_name was `name`.
    train = config_from_dict(TrainConfig, {"features": "old-store", "run_name": "r"})
    assert (train.store, train.name) == ("old-store", "r")
    assert config_from_dict(TrainConfig, {"store": "new", "features": "old"}).store == "new"  # the new name wins
    extract = config_from_dict(ExtractConfig, {"name": "mine", "features": "spatial"})
    assert (extract.store_name, extract.name, extract.features) == ("mine", "mine", "spatial")
    assert ExtractConfig(backbone="b").name == "b-pooled" and ExtractConfig().store_name is None
    compare = CompareConfig(arms=[["softmax", "adamw"]], optimizers=["sgd"])
    assert load_config(CompareConfig, save_config(compare, tmp_path / "c.json")) == compare
    assert compare.arms == (("softmax", "adamw"),) and compare.store == TrainConfig.store
    with pytest.raises(ConfigError, match="holds a CompareConfig, not a SweepConfig"):
        load_config(SweepConfig, tmp_path / "c.json")  # its keys would be ignored, defaults taking their place


def test_ocr_names_and_rehearsal_sizes_match_their_sources():
    """The CLI builds every option from prodcat.config without importing the OCR or rehearsal code (numpy,
    pyarrow): the names and counts kept there must be those of the registries and of the real data."""
    from prodcat.config import OCR_ENGINES, OCR_SELECTORS, FullRehearsalConfig
    from prodcat.ocr.engine import list_engines
    from prodcat.ocr.select import list_selectors
    from prodcat.rehearsal.synthetic import REAL

    assert sorted(OCR_ENGINES) == list_engines() and sorted(OCR_SELECTORS) == list_selectors()
    plan = FullRehearsalConfig()
    assert (plan.products, plan.test_products) == (REAL["train_products"], REAL["test_products"])


def test_loss_names_match_the_loss_registry():
    """config.LOSS_NAMES lets a typo fail before torch loads; it must list exactly the registered losses."""
    from prodcat.config import LOSS_NAMES
    from prodcat.model import list_losses

    assert sorted(LOSS_NAMES) == sorted(list_losses())
