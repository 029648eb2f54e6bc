"""Build the files installed beside khod: manual pages and shell completions.

    python tools/gendata.py [--prefix DIR]      (DIR defaults to build/data)

writes, under DIR/share:

    man/man8/khod.8, man/man8/khoctl.8   from the argument parsers (argparse-manpage)
    man/man5/khod.toml.5                 from config/khod.toml's comments, checked
                                         against khod/config.py's keys and defaults
    bash-completion/completions/khod, khoctl    (shtab)
    zsh/site-functions/_khod, _khoctl           (shtab)

Nothing here is kept by hand in roff or shell, and nothing here is imported
by khod or khoctl at run time: ``make install`` runs this into the venv
(where ``man`` and bash-completion look, beside its ``bin``), and packagers
run ``make install-data PREFIX=/usr DESTDIR=...``. The tests render the
pages with ``groff -ww`` and complete through the bash script.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import shtab
from argparse_manpage.manpage import Manpage
from khoclient import ctl

from khod import __version__, main
from khod.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_SOCKET,
    PERCENT_KEYS,
    SECTIONS,
    SIZE_KEYS,
    Config,
)
from khod.startup import Exit

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILE = ROOT / "config" / "khod.toml"
MANUAL = "khod manual"

# arguments that name a file: the shells complete paths there
FILE_ARGS = {
    "khod": {"config", "socket", "region_path"},
    "khoctl": {"socket", "output", "region"},
}


def roff(text: str) -> str:
    r"""Plain text as roff: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + ln if ln[:1] in (".", "'") else ln for ln in text.split("\n"))


def definitions(items: list[tuple[str, str]]) -> str:
    """A ``.TP`` list: (term in bold, its text)."""
    return "\n".join(f".TP\n.B {roff(term)}\n{roff(text)}" for term, text in items)


def see_also(*pages: tuple[str, str]) -> str:
    return ",\n".join(f".BR {name} ({section})" for name, section in pages)


# ----------------------------------------------------------------------------- khod(8), khoctl(8)


def manpage(ap: argparse.ArgumentParser, description: str) -> Manpage:
    """argparse-manpage's page for ``ap``: NAME from its description, DESCRIPTION given."""
    short, ap.description = ap.description, None  # DESCRIPTION says more, once
    page = Manpage(
        ap,
        {
            "project_name": "khod",
            "version": __version__,
            "manual_section": 8,
            "manual_title": MANUAL,
            "description": short,
        },
    )
    page.add_section("description", "=", roff(description))
    return page


def khod_page() -> str:
    page = manpage(
        main.parser(),
        "khod manages a memory region (a file, a /dev/mem window of reserved memory, or "
        "a DAX device) from which workloads allocate folios that survive a live update: "
        "khoctl finalize writes Linux KHO v5 metadata into the region, and the daemon "
        "that starts next restores each folio to its session. Clients speak msgpack over "
        "a Unix socket; operators use khoctl(8). Command-line options override the "
        "configuration file, khod.toml(5).",
    )
    page.add_section("exit status", ">", definitions([(str(int(e)), e.meaning) for e in Exit]))
    page.add_section(
        "files",
        ">",
        definitions(
            [
                (DEFAULT_CONFIG_PATH, "the configuration, read if present (khod.toml(5))"),
                (DEFAULT_SOCKET, "the control socket (server.socket), unless systemd passes one"),
            ]
        ),
    )
    page.add_section(
        "signals",
        ">",
        roff(
            "SIGTERM and SIGINT stop the daemon: without a handover unless "
            "server.handover_on_stop is set, or always with one when finalized."
        ),
    )
    page.add_section("see also", ">", see_also(("khoctl", "8"), ("khod.toml", "5")))
    return str(page)


def khoctl_page() -> str:
    ap = ctl.parser()
    statuses = exit_statuses()
    ap.epilog = None  # the exit statuses get a section of their own
    page = manpage(
        ap,
        "khoctl asks a running khod(8) for its status and sessions, drives a handover "
        "(finalize, unfreeze, handover), frees what nobody claimed, and reads a region "
        "offline (inspect), without a daemon. Scripts get one JSON document with --json "
        "and tell failures apart by the exit status.",
    )
    page.add_section(
        "exit status", ">", definitions([(f"{n} ({name})", text) for n, name, text in statuses])
    )
    page.add_section(
        "environment",
        ">",
        definitions([("KHOD_SOCKET", "khod's socket when --socket is not given")]),
    )
    page.add_section("see also", ">", see_also(("khod", "8"), ("khod.toml", "5")))
    return str(page)


def exit_statuses() -> list[tuple[int, str, str]]:
    """khoctl's exit statuses as its docstring (and --help) lists them."""
    out = [
        (int(m.group(1)), m.group(2), m.group(3).strip())
        for m in re.finditer(r"^\s+(\d+)\s+([A-Z_]+)\s+(.+)$", ctl.__doc__ or "", re.M)
    ]
    listed = {(n, name) for n, name, _ in out}
    members = {(int(e), e.name) for e in ctl.Exit}
    if listed != members:
        raise SystemExit(f"khoctl's docstring and its Exit enum differ: {listed ^ members}")
    return out


# ----------------------------------------------------------------------------- khod.toml(5)


@dataclasses.dataclass
class Entry:
    keys: list[tuple[str, str]]  # (key, default as written)
    comment: list[str]


def config_entries(text: str) -> tuple[list[str], dict[str, list[Entry]]]:
    """The file's opening comment and, per section, keys with the comment above them.

    Keys written one under the other share the comment above the first.
    """
    intro: list[str] = []
    sections: dict[str, list[Entry]] = {}
    section: str | None = None
    comment: list[str] = []
    last: Entry | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            if section is None and comment:
                intro, comment = comment, []
            last = None
        elif stripped.startswith("#"):
            comment.append(stripped[2:] if stripped.startswith("# ") else stripped[1:])
            last = None
        elif m := re.fullmatch(r"\[(\w+)\]", stripped):
            if section is None and comment:
                intro = comment
            section, comment, last = m.group(1), [], None
            sections[section] = []
        elif m := re.fullmatch(r"(\w+)\s*=\s*(.+)", stripped):
            if section is None:
                raise SystemExit(f"{CONFIG_FILE}: {stripped!r} outside a section")
            if last is not None and not comment:
                last.keys.append((m.group(1), m.group(2)))
            else:
                last = Entry([(m.group(1), m.group(2))], comment)
                sections[section].append(last)
            comment = []
        else:
            raise SystemExit(f"{CONFIG_FILE}: cannot read {line!r}")
    return intro, sections


def comment_roff(lines: list[str]) -> str:
    """Comment text as roff: lines indented further are kept as they are (tables, examples)."""
    out: list[str] = []
    para: list[str] = []
    pre: list[str] = []

    def flush() -> None:
        # .nf and .fi keep the indentation of a .TP body, where .RS would not
        if para:
            out.append(roff(" ".join(para)))
            para.clear()
        if pre:
            out.extend([".nf", *(roff("  " + p) for p in pre), ".fi"])
            pre.clear()

    for ln in lines:
        if ln.startswith("  "):
            if para:
                flush()
            pre.append(ln[2:])
        else:
            if pre:
                flush()
            para.append(ln.strip())
    flush()
    return "\n".join(out)


def kind(section: str, key: str, default: Any) -> str:
    if (section, key) in PERCENT_KEYS:
        return "size or percentage"
    if (section, key) in SIZE_KEYS:
        return "size"
    if isinstance(default, bool):
        return "boolean"
    if isinstance(default, int | float):
        return "number"
    return "string"


def khod_toml_page() -> str:
    intro, sections = config_entries(CONFIG_FILE.read_text())
    defaults = Config()
    lines = [
        f'.TH KHOD.TOML 5 "" "khod {__version__}" "{MANUAL}"',
        ".SH NAME",
        "khod.toml \\- configuration of the khod daemon",
        ".SH SYNOPSIS",
        f".B {roff(DEFAULT_CONFIG_PATH)}",
        ".SH DESCRIPTION",
        comment_roff(intro),
        ".PP",
        roff(
            "The sections and keys follow, each with its default value as the packaged "
            "config/khod.toml writes it."
        ),
    ]
    for section, cls in SECTIONS.items():
        entries = sections.get(section)
        if entries is None:
            raise SystemExit(f"{CONFIG_FILE}: section [{section}] is not documented")
        documented = [k for e in entries for k, _ in e.keys]
        known = [f.name for f in dataclasses.fields(cls)]
        if sorted(documented) != sorted(known):
            raise SystemExit(
                f"{CONFIG_FILE}: [{section}] documents {sorted(documented)}, khod reads {sorted(known)}"
            )
        lines.append(f".SH [{section.upper()}]")
        for e in entries:
            for i, (key, written) in enumerate(e.keys):
                default = getattr(getattr(defaults, section), key)
                lines.append(".TP" if i == 0 else ".TQ")
                lines.append(f"\\fB{key}\\fR = {roff(written)}  ({kind(section, key, default)})")
            lines.append(comment_roff(e.comment) if e.comment else roff("(no notes)"))
    lines += [
        ".SH FILES",
        definitions([(DEFAULT_CONFIG_PATH, "read by khod(8) at start when present")]),
        ".SH SEE ALSO",
        see_also(("khod", "8"), ("khoctl", "8")),
    ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- completions


def with_file_args(ap: argparse.ArgumentParser, names: set[str]) -> argparse.ArgumentParser:
    """Mark the arguments that name files, in the parser and all its subcommands."""
    for parser in walk(ap):
        for action in parser._actions:
            if action.dest in names:
                action.complete = shtab.FILE  # type: ignore[attr-defined]
    return ap


def walk(ap: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield ap
    for action in ap._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from walk(sub)


def completion(prog: str, shell: str) -> str:
    ap = main.parser() if prog == "khod" else ctl.parser()
    return shtab.complete(with_file_args(ap, FILE_ARGS[prog]), shell=shell)


# ----------------------------------------------------------------------------- out


def outputs() -> dict[str, str]:
    """Path under the prefix -> contents."""
    out = {
        "share/man/man8/khod.8": khod_page(),
        "share/man/man8/khoctl.8": khoctl_page(),
        "share/man/man5/khod.toml.5": khod_toml_page(),
    }
    for prog in ("khod", "khoctl"):
        out[f"share/bash-completion/completions/{prog}"] = completion(prog, "bash")
        out[f"share/zsh/site-functions/_{prog}"] = completion(prog, "zsh")
    return out


def main_(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write khod's manual pages and completions")
    ap.add_argument("--prefix", default=str(ROOT / "build" / "data"), help="install prefix")
    args = ap.parse_args(argv)
    prefix = Path(args.prefix)
    for rel, text in outputs().items():
        path = prefix / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main_())
