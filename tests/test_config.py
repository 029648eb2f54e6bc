"""Configuration: the documented file, sizes, overrides, and refusals that name the key."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from khod.config import SECTIONS, Config, ConfigError, from_mapping, load, override, parse_size

ROOT = Path(__file__).resolve().parent.parent
PACKAGED = ROOT / "config" / "khod.toml"


def test_packaged_file_is_the_defaults_and_documents_every_key() -> None:
    cfg = load(str(PACKAGED))
    assert cfg.as_dict() == Config().as_dict()
    text = PACKAGED.read_text()
    raw = tomllib.loads(text)
    for section, cls in SECTIONS.items():
        keys = {f.name for f in fields(cls)}
        assert set(raw[section]) == keys, f"[{section}] in config/khod.toml differs from the code"
        block = text.split(f"[{section}]", 1)[1]
        for key in keys:  # every key has a comment somewhere above it in its section
            before = block.split(f"\n{key} =", 1)[0]
            assert re.search(r"\n#", before), f"{section}.{key} is not documented"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096),
        ("64G", 64 << 30),
        ("16M", 16 << 20),
        ("0x100000000", 1 << 32),
        ("1K", 1024),
        ("2MiB", 2 << 20),
        ("1t", 1 << 40),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text, "x") == size


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"region": {"bogus": 1}}, r"region\.bogus: unknown key"),
        ({"nonsense": {}}, r"unknown section \[nonsense\]"),
        ({"region": {"size": "lots"}}, r"region\.size: 'lots' is not a size"),
        ({"region": {"size": True}}, r"region\.size: expected a size"),
        ({"region": {"base": 0x1001}}, r"region\.base 0x1001 is not page-aligned"),
        ({"region": {"size": "1G", "scratch_size": "2G"}}, r"region\.scratch_size .* does not fit"),
        ({"region": {"size": 12345}}, r"region\.size 12345 is not a positive multiple of 4096"),
        ({"region": {"size": "auto"}}, r"'auto' only works with the dax backend"),
        ({"region": {"backend": "nvram"}}, r"region\.backend must be file, devmem or dax"),
        ({"server": {"socket_mode": "0660"}}, r"server\.socket_mode: expected an integer"),
        ({"server": {"notifier_timeout_s": 0}}, r"server\.notifier_timeout_s must be in"),
        (
            {"server": {"handover_on_stop": "yes"}},
            r"server\.handover_on_stop: expected true or false",
        ),
        ({"server": {"socket": "/" + "x" * 120}}, r"server\.socket is longer"),
        (
            {"server": {"operator_group": "no-such-group-khod"}},
            r"server\.operator_group: no group named",
        ),
        ({"metrics": {"listen": "localhost"}}, r"metrics\.listen: 'localhost' is not host:port"),
        ({"limits": {"max_frame": 100}}, r"limits\.max_frame must be at least 4096"),
        ({"logging": {"level": "loud"}}, r"logging\.level must be"),
    ],
)
def test_bad_values_name_the_key_and_the_file(
    data: dict[str, dict[str, object]], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as e:
        from_mapping(data, source="/etc/khod/test.toml")
    assert "/etc/khod/test.toml" in e.value.message


def test_dax_may_size_itself_and_overrides_win() -> None:
    cfg = from_mapping({"region": {"backend": "dax", "path": "/dev/dax0.0", "size": "auto"}}, "f")
    assert cfg.region.size is None
    cfg = override(
        Config(), ['region.size="2G"', "server.notifier_timeout_s=3", 'metrics.listen=""']
    )
    assert (cfg.region.size, cfg.server.notifier_timeout_s, cfg.metrics.listen) == (
        2 << 30,
        3.0,
        "",
    )
    with pytest.raises(ConfigError, match=r"expected section\.key=value"):
        override(Config(), ["nonsense"])


def khod(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "khod", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_prints_the_effective_configuration(tmp_path: Path) -> None:
    f = tmp_path / "k.toml"
    f.write_text('[region]\nsize = "2G"\n[server]\nsocket = "/tmp/x.sock"\n')
    r = khod(
        "--config",
        str(f),
        "--check-config",
        "--metrics-listen",
        "",
        "--set",
        "limits.max_sessions=7",
    )
    assert r.returncode == 0, r.stderr
    effective = tomllib.loads(r.stdout)
    assert effective["region"]["size"] == 2 << 30
    assert effective["server"]["socket"] == "/tmp/x.sock"
    assert effective["metrics"]["listen"] == ""
    assert effective["limits"]["max_sessions"] == 7
    assert str(f) in r.stdout
    # the packaged file itself is valid
    assert khod("--config", str(PACKAGED), "--check-config").returncode == 0


def test_a_bad_file_stops_start_up(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[region]\nsize = 'huge'\n")
    r = khod("--config", str(f))
    assert r.returncode == 2
    assert f"{f}: region.size: 'huge' is not a size" in r.stderr
    f.write_text("[region\n")
    r = khod("--config", str(f), "--check-config")
    assert r.returncode == 2 and "not valid TOML" in r.stderr
    r = khod("--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr
