"""pipeline.pairs_export: the held-out shards' pairs as image folders, from the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.pairs_export import main
from spasem.shards import decode_member, read_tar
from tests.test_train_data import _write_shards


@pytest.fixture
def prepared(tmp_path) -> tuple[Path, list[list[str]]]:
    keys = _write_shards(tmp_path / "prepared" / "shards", [2, 3, 2], annotated=False)
    return tmp_path / "prepared", keys


def _written(out: Path, kind: str) -> list[str]:
    return sorted(p.stem for p in (out / kind).glob("*.png"))


def test_last_n_shards_are_exported_as_the_images_the_shards_hold(prepared, tmp_path, capsys):
    folder, keys = prepared
    out = tmp_path / "heldout"
    assert main(["--input", str(folder), "--output", str(out), "--last", "2"]) == 0
    assert _written(out, "lr") == _written(out, "hr") == sorted(keys[1] + keys[2])
    assert "exported 5 pairs" in capsys.readouterr().out
    _, members = read_tar((folder / "shards" / "shard-000002.tar").read_bytes())[0]
    exported = decode_member("png", (out / "hr" / f"{keys[2][0]}.png").read_bytes())
    assert np.array_equal(exported, decode_member("hr.png", members["hr.png"]))
    # --limit caps the count
    limited = tmp_path / "limited"
    assert main(["--input", str(folder), "--output", str(limited), "--last", "3", "--limit", "3"]) == 0
    assert len(_written(limited, "lr")) == 3


def test_last_zero_exports_nothing_and_negative_counts_are_refused(prepared, tmp_path, capsys):
    folder, _ = prepared
    out = tmp_path / "none"
    assert main(["--input", str(folder), "--output", str(out), "--last", "0"]) == 0
    assert not (out / "lr").exists() and "exported 0 pairs" in capsys.readouterr().out
    for flag in ("--last", "--limit"):
        with pytest.raises(SystemExit) as exc:
            main(["--input", str(folder), "--output", str(out), flag, "-1"])
        assert exc.value.code == 2 and "must be 0 or more, got -1" in capsys.readouterr().err


def test_config_and_set_are_taken_as_by_every_entry_point(prepared, tmp_path, capsys):
    folder, keys = prepared
    config = tmp_path / "export.yaml"
    config.write_text(f"input: {folder}\n")
    out = tmp_path / "from-config"
    assert main(["--config", str(config), "--output", str(out)]) == 0  # --input from the config file
    assert _written(out, "lr") == sorted(keys[2])
    with pytest.raises(SystemExit) as exc:
        main(["--config", str(config), "--set", "storage.no_such_key=1"])
    assert exc.value.code == 2 and "storage.no_such_key" in capsys.readouterr().err


def test_no_shards_is_a_one_line_error(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "empty"), "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no finished shards") and "pipeline.prepare" in err[0]
