"""Typed configuration: defaults, TOML, overrides, and all errors reported at once."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from offsite.config import OffsiteConfig, describe, load_config, parse_override
from offsite.errors import ConfigError


def test_defaults_are_the_documented_main_job() -> None:
    config = load_config()
    assert config == OffsiteConfig()
    assert config.model.name == "smollm2-135m" and config.data.name == "bbc-news"
    assert config.federation.num_clients == 4
    assert (config.emulator.bottom, config.emulator.top) == (1, 3)


def test_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('seed = 7\n[train]\nlr = 0.01\nadapter = "full"\n')
    config = load_config(path, ["train.lr=0.002", "federation.rounds=5", "data.name=my.jsonl"])
    assert config.seed == 7
    assert config.train.adapter == "full"
    assert config.train.lr == 0.002
    assert config.federation.rounds == 5
    assert config.data.name == "my.jsonl"  # a bare word is kept as a string


def test_all_errors_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(
            None,
            ["train.lr=abc", "nope.x=1", "emulator.keep=0", "train.adapter=prefix", "seed=true"],
        )
    message = str(info.value)
    for fragment in ("train.lr", "unknown key nope", "emulator.keep", "train.adapter", "seed"):
        assert fragment in message


def test_int_given_for_float_is_accepted_but_bool_is_not() -> None:
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match=r"federation\.rounds must be an integer"):
        load_config(None, ["federation.rounds=true"])


def test_sections_validate_on_construction() -> None:
    from offsite.config import FederationConfig

    with pytest.raises(ConfigError, match="fraction_train"):
        FederationConfig(fraction_train=0.0)


def test_bad_files_and_overrides(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("novalue")


def test_template_must_have_one_slot() -> None:
    with pytest.raises(ConfigError, match="template"):
        load_config(None, ['data.template="no slot"'])


def test_roundtrip_through_toml(tmp_path: Path) -> None:
    config = load_config(None, ["federation.rounds=2"])
    path = tmp_path / "saved.toml"
    path.write_text(config.to_toml())
    assert load_config(path) == config


def test_every_key_has_help() -> None:
    rows = describe()
    assert len(rows) > 20
    assert all(help_text for _, _, help_text in rows)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["federation.secure_aggregation=true", "federation.num_clients=2"], ">= 3 clients"),
        (
            ["federation.secure_aggregation=true", "federation.aggregation='trimmed-mean'"],
            "only with aggregation='fedavg'",
        ),
        (["federation.secure_aggregation=true", "federation.secagg_threshold=2"], "(2, 4]"),
        (["federation.aggregation='krum'", "federation.num_clients=4"], "n >= 2f + 3"),
        (["privacy.epsilon=1", "privacy.noise_multiplier=0.5"], "at most 0 rounds"),
        (
            ["privacy.epsilon=4", "federation.aggregation='krum'", "federation.num_clients=5"],
            "fedavg",
        ),
        (["federation.min_replies=5"], "can never be met"),
        (
            ["federation.lora_aggregation='merge-exact'", "train.adapter='full'"],
            "trains no LoRA",
        ),
        (
            ["federation.lora_aggregation='merge-exact'", "train.upload='sparse'"],
            "use train.upload='dense'",
        ),
        (
            ["federation.lora_aggregation='merge-exact'", "federation.serve_url='http://x:1'"],
            "merged checkpoint instead",
        ),
        (["train.client_ranks='8,4'"], "only federation.lora_aggregation='merge-exact'"),
        (
            ["federation.lora_aggregation='merge-exact'", "train.client_ranks='8,16'"],
            "each be in [1, train.lora_r=8]",
        ),
        (
            ["federation.lora_aggregation='merge-exact'", "train.client_ranks='8,x'"],
            "comma-separated integers",
        ),
        (["federation.lora_aggregation='exact'"], "'naive', 'merge-exact'"),
        (
            ["federation.lora_aggregation='merge-exact'", "federation.strategy='fedadam'"],
            "a fresh LoRA, so that difference is noise",
        ),
    ],
)
def test_unsafe_federation_settings_are_refused_before_running(
    overrides: list[str], fragment: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(None, overrides)


def test_overrides_name_every_changed_setting_and_load_back_to_the_same_config() -> None:
    from offsite.config import OffsiteConfig, load_config

    assert OffsiteConfig().overrides() == []
    changed = [
        "seed=3",
        "data.eval_size=500",
        "emulator.selection='cosine'",
        "emulator.distill=true",
        "train.lr=0.002",
        "data.template='Q: {text}\\nA:'",
    ]
    config = load_config(None, changed)
    again = load_config(None, config.overrides())
    assert again == config and len(config.overrides()) == len(changed)


@pytest.mark.parametrize(
    "overrides",
    [
        ["federation.secure_aggregation=true"],
        ["privacy.epsilon=8", "federation.num_clients=8"],
        ["federation.aggregation='trimmed-mean'"],
        ["train.adapter='lora-top'", "train.client_ranks='8, 4,2'"],
        ["train.adapter='lora-fa'"],
        ["federation.strategy='fedprox'", "federation.proximal_mu=0.01"],
    ],
)
def test_merge_exact_composes_with_secure_aggregation_dp_and_robust_rules(
    overrides: list[str],
) -> None:
    config = load_config(None, ["federation.lora_aggregation='merge-exact'", *overrides])
    assert config.federation.lora_aggregation == "merge-exact"
    assert config.train.ranks in ((), (8, 4, 2))
