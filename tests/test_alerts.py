"""config/prometheus/khod.rules.yml: promtool passes it and its unit tests, and they cover it.

promtool runs the unit tests (every alert firing and not firing); these tests
make sure there is one alert per condition an operator acts on, that each
says what to do, that each is tested both ways, that every metric the rules
read is one khod exports, and that the README lists the alerts.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from .helpers import inproc_daemon
from .test_metrics import samples, scrape

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "config" / "prometheus" / "khod.rules.yml"
RULE_TESTS = ROOT / "config" / "prometheus" / "khod.rules.test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: Debian's prometheus package is not installed"
)

# one per condition of the operator kit (issue 14), each an operator must act on
CONDITIONS = {
    "KhodDown": "khod down",
    "KhodAbsent": "khod not scraped",
    "KhodHandoverRejected": "a refused handover",
    "KhodFinalizedTooLong": "finalized too long without a handover",
    "KhodFinalizeFailing": "finalize failing or vetoed repeatedly",
    "KhodRegionNearlyFull": "the region nearly full",
    "KhodIncomingUnclaimed": "incoming memory unclaimed for long",
    "KhodNotifierNearTimeout": "a notifier near its timeout",
    "KhodRequestErrorsSpiking": "request errors by code spiking",
}


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


@needs_promtool
@pytest.mark.parametrize(
    "command", [["check", "rules", RULES.name], ["test", "rules", RULE_TESTS.name]]
)
def test_promtool_passes_the_rules_and_their_unit_tests(command: list[str]) -> None:
    r = subprocess.run(
        [PROMTOOL or "promtool", *command],
        cwd=RULES.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_one_alert_per_condition_each_saying_what_to_do() -> None:
    found = alerts()
    assert set(found) == set(CONDITIONS)
    for name, rule in found.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        notes = rule["annotations"]
        assert set(notes) >= {"summary", "description"}, name
        assert len(notes["summary"]) < 160, f"{name}: a summary is one line"
        # what to do: a command or a setting to change, not just what happened
        assert re.search(r"`[^`]+`|server\.\w+|region\.\w+", notes["description"]), name


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    assert doc["rule_files"] == [RULES.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else quiet).add(t["alertname"])
            for exp in t.get("exp_alerts") or []:
                assert set(exp["exp_annotations"]) == {"summary", "description"}
    assert firing == set(CONDITIONS), sorted(set(CONDITIONS) ^ firing)
    assert quiet == set(CONDITIONS), sorted(set(CONDITIONS) ^ quiet)
    recorded = {r["record"] for r in rules() if "record" in r}
    tested = {e["expr"] for case in doc["tests"] for e in case.get("promql_expr_test", [])} | {
        name for name in recorded if any(name in a["expr"] for a in alerts().values())
    }
    assert recorded <= tested, sorted(recorded - tested)


async def test_the_rules_read_only_metrics_khod_exports(shm_dir: Path) -> None:
    async with inproc_daemon(shm_dir, with_metrics=True) as d:
        _, body = await scrape(d.metrics_url)
    exported = {name for name, _ in samples(body)}
    used = {m for r in rules() for m in re.findall(r"\bkhod_[a-z_]+\b", r["expr"])}
    assert len(used) >= 9
    assert used <= exported, sorted(used - exported)
    # label values the rules select on are ones khod uses
    assert 'khod_state{khod_state="finalized"}' in body
    assert 'khod_region_bytes{use="free"}' in body
    assert 'code="OK"' in body and 'result="ok"' in body


def test_the_readme_lists_the_alerts() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    for name in CONDITIONS:
        assert f"`{name}`" in section, name
    assert "config/prometheus/khod.rules.yml" in section
