"""The typed config: defaults, YAML, dotted overrides, and errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from pipeline.prepare import main as prepare_main
from spasem.config import ConfigError, load_config, parse_override


def test_defaults_from_tiny_profile():
    cfg = load_config()
    assert cfg.data.scale == 4 and cfg.data.lr_size == cfg.data.hr_size // 4
    assert cfg.degradation.preset == "xpsr"
    assert cfg.prepare.phases == ["shard", "annotate"]


def test_design_defaults_without_yaml(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    cfg = load_config(empty)
    assert (cfg.data.hr_size, cfg.data.scale, cfg.degradation.preset) == (512, 4, "xpsr")


def test_overrides_are_typed():
    cfg = load_config(None, ["data.hr_size=256", "degradation.preset=realesrgan", "prepare.phases=[shard]"])
    assert cfg.data.hr_size == 256 and isinstance(cfg.data.hr_size, int)
    assert cfg.degradation.preset == "realesrgan"
    assert cfg.prepare.phases == ["shard"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("data.hr_sise=256", "did you mean 'data.hr_size'"),
        ("degradaton.preset=xpsr", "did you mean 'degradation'"),
        ("data.scale=four", "data.scale"),
        ("degradation.preset=bsrgan", "degradation.preset"),
        ("data.hr_size=130", "divisible by data.scale"),
        ("data.hr_size", "dotted.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert fragment in str(exc.value)


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"shard_sz": 4}}))
    with pytest.raises(ConfigError, match="did you mean 'data.shard_size'"):
        load_config(path)


def test_parse_override_values():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=s3://x/y") == ("a.b", "s3://x/y")


def test_cli_rejects_typo_with_suggestion(capsys):
    with pytest.raises(SystemExit) as exc:
        prepare_main(["--set", "data.crops_per_imag=2"])
    assert exc.value.code == 2
    assert "did you mean 'data.crops_per_image'" in capsys.readouterr().err


def test_help_lists_keys_with_defaults(capsys):
    with pytest.raises(SystemExit):
        prepare_main(["--help"])
    out = capsys.readouterr().out
    for key in ("data.hr_size = 512", "data.scale = 4", "degradation.preset = 'xpsr'", "--set KEY=VALUE"):
        assert key in out


def test_cli_makes_local_uris_absolute_and_keeps_s3(tmp_path, monkeypatch):
    # Ray Train workers run in their own working directory: a relative --output must not land there
    from spasem.config import build_parser, parse_cli

    monkeypatch.chdir(tmp_path)
    parser = build_parser("t", "t", ["data"])
    _, cfg = parse_cli(parser, ["--input", "s3://bucket/hr", "--output", "runs/x"], "unused", "unused")
    assert cfg.input == "s3://bucket/hr"
    assert cfg.output == str(tmp_path / "runs" / "x")
    _, cfg = parse_cli(parser, [], "photos", "out")
    assert (cfg.input, cfg.output) == (str(tmp_path / "photos"), str(tmp_path / "out"))
