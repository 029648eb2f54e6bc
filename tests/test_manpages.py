"""Manual pages and shell completions, built by tools/gendata.py from the code.

The pages must render without a warning and name every subcommand, option,
configuration key and exit status the code has; the completion scripts must
load in bash (and zsh) and complete what the parsers accept.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from khoclient import ctl

from khod import main
from khod.config import SECTIONS, Config
from khod.startup import Exit

ROOT = Path(__file__).resolve().parent.parent
GROFF = shutil.which("groff")
MAN = shutil.which("man")
BASH = shutil.which("bash")
ZSH = shutil.which("zsh")


def gendata() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gendata", ROOT / "tools" / "gendata.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gendata"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What ``make install`` installs, built the way it builds it."""
    prefix = tmp_path_factory.mktemp("data")
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gendata.py"), "--prefix", str(prefix)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return prefix / "share"


PAGES = ["man8/khod.8", "man8/khoctl.8", "man5/khod.toml.5"]


def source(data: Path, page: str) -> str:
    """A page's roff with the escapes of plain characters undone."""
    text = (data / "man" / page).read_text()
    text = re.sub(r"\\f[BIRP]|\\[,/]", "", text)  # fonts and italic corrections
    return text.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "")


def parsers(ap: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield "", ap
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


@pytest.mark.skipif(GROFF is None, reason="groff missing: Debian's groff-base is not installed")
@pytest.mark.parametrize("page", PAGES)
def test_the_pages_render_without_warnings(data: Path, page: str) -> None:
    r = subprocess.run(
        [GROFF or "groff", "-man", "-ww", "-z", "-Tutf8", str(data / "man" / page)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    if MAN is not None:  # and man(1) itself, which runs its own preprocessors
        r = subprocess.run(
            [MAN, "--warnings", "-l", str(data / "man" / page)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80", "LANG": "C.UTF-8"},
        )
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert len(r.stdout.splitlines()) > 30


@pytest.mark.parametrize(
    ("page", "build"), [("man8/khod.8", main.parser), ("man8/khoctl.8", ctl.parser)]
)
def test_the_command_pages_name_every_subcommand_and_option(
    data: Path, page: str, build: object
) -> None:
    text = source(data, page)
    ap = build()  # type: ignore[operator]
    assert text.startswith(f'.TH {ap.prog.upper()} "8"')
    assert f"{ap.prog} - {ap.description}" in text  # NAME
    seen = 0
    for name, p in parsers(ap):
        if name:
            assert f"{ap.prog} {name}" in text, name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):  # -h is in the synopsis only
                continue
            for opt in action.option_strings:
                assert re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", text), (name, opt)
                seen += 1
            if action.help and action.help != argparse.SUPPRESS and action.option_strings:
                assert action.help.split("(")[0].strip()[:30] in text, (name, action.help)
    assert seen >= 10
    assert ".SH EXIT STATUS" in text and ".SH SEE ALSO" in text


def test_the_exit_statuses_are_the_code_s(data: Path) -> None:
    khod_text = source(data, "man8/khod.8")
    for e in Exit:
        assert f".B {int(e)}\n{e.meaning}" in khod_text
    ctl_text = source(data, "man8/khoctl.8")
    for e in ctl.Exit:
        assert f".B {int(e)} ({e.name})\n" in ctl_text


def test_the_config_page_documents_every_key_with_its_default(data: Path) -> None:
    text = source(data, "man5/khod.toml.5")
    toml = (ROOT / "config" / "khod.toml").read_text()
    defaults = Config()
    for section, cls in SECTIONS.items():
        assert f".SH [{section.upper()}]" in text
        for key in cls.__dataclass_fields__:
            written = re.search(rf"^{key} = (.+)$", toml, re.M)
            assert written, key
            assert f"\n{key} = {written.group(1)}  (" in text, key
            assert getattr(getattr(defaults, section), key) is not None or key == "size"
    # the comments come along, tables kept as they are
    assert "Where preserved memory lives." in text
    assert '.nf\n  "file"    a sparse regular file' in text


def test_the_generator_refuses_a_config_file_out_of_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = gendata()
    toml = (ROOT / "config" / "khod.toml").read_text()
    for broken, why in [
        (toml.replace("send_queue = 256\n", ""), "khod reads"),
        (toml.replace("[logging]", "[logging]\nnew_key = 1"), "khod reads"),
        (toml.replace("[metrics]", "[metrix]"), r"\[metrics\] is not documented"),
    ]:
        path = tmp_path / "khod.toml"
        path.write_text(broken)
        monkeypatch.setattr(g, "CONFIG_FILE", path)
        with pytest.raises(SystemExit, match=why):
            g.khod_toml_page()


def test_roff_escaping() -> None:
    g = gendata()
    assert g.roff(".hidden\n'also\nback\\slash --opt") == (
        "\\&.hidden\n\\&'also\nback\\eslash \\-\\-opt"
    )


# ----------------------------------------------------------------------------- completions


def bash_complete(script: Path, *words: str) -> list[str]:
    """What bash offers for the last of ``words``, through the function the script registers."""
    quoted = " ".join(f"'{w}'" for w in words)
    code = f"""
source '{script}'
fn=$(complete -p {words[0]} | sed -n 's/.* -F \\([^ ]*\\) .*/\\1/p')
COMP_WORDS=({quoted})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_LINE="${{COMP_WORDS[*]}}"
COMP_POINT=${{#COMP_LINE}}
COMPREPLY=()
"$fn" {words[0]} "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    r = subprocess.run(
        [BASH or "bash", "--norc", "--noprofile", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    return sorted(line.strip() for line in r.stdout.splitlines() if line.strip())


@pytest.mark.skipif(BASH is None, reason="bash missing")
def test_bash_completes_khoctl_subcommands_options_and_files(data: Path, tmp_path: Path) -> None:
    script = data / "bash-completion" / "completions" / "khoctl"
    commands = sorted(name for name, _ in parsers(ctl.parser()) if name)
    assert len(commands) == 9
    assert bash_complete(script, "khoctl", "") == commands
    assert bash_complete(script, "khoctl", "re") == ["release-unclaimed"]
    assert bash_complete(script, "khoctl", "--json", "dr") == ["drop-session"]
    assert {"--socket", "--json", "--timeout"} <= set(bash_complete(script, "khoctl", "--"))
    assert bash_complete(script, "khoctl", "fdt", "") == ["in", "out"]
    assert set(bash_complete(script, "khoctl", "fdt", "--")) >= {"--output"}
    assert set(bash_complete(script, "khoctl", "release-unclaimed", "--")) >= {"--session", "--uid"}
    (tmp_path / "region-a").write_bytes(b"")
    (tmp_path / "other").write_bytes(b"")
    assert bash_complete(script, "khoctl", "inspect", f"{tmp_path}/reg") == [f"{tmp_path}/region-a"]


@pytest.mark.skipif(BASH is None, reason="bash missing")
def test_bash_completes_khod_options(data: Path, tmp_path: Path) -> None:
    script = data / "bash-completion" / "completions" / "khod"
    offered = set(bash_complete(script, "khod", "--"))
    expected = {o for a in main.parser()._actions for o in a.option_strings if o.startswith("--")}
    assert offered == expected
    assert bash_complete(script, "khod", "--log-level", "w") == ["warning"]
    (tmp_path / "khod.toml").write_text("")
    assert bash_complete(script, "khod", "--config", f"{tmp_path}/kh") == [f"{tmp_path}/khod.toml"]


@pytest.mark.skipif(ZSH is None, reason="zsh missing: Debian's zsh is not installed")
@pytest.mark.parametrize("prog", ["khod", "khoctl"])
def test_the_zsh_scripts_load_and_define_their_completer(data: Path, prog: str) -> None:
    fpath = data / "zsh" / "site-functions"
    code = (
        f"fpath=('{fpath}' $fpath); autoload -Uz compinit; compinit -u -D; "
        f"print -r -- ${{_comps[{prog}]}}; autoload +X _{prog} && whence -w _{prog}"
    )
    r = subprocess.run(
        [ZSH or "zsh", "-f", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(data)},
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.split() == [f"_{prog}", f"_{prog}:", "function"]
