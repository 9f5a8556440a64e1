"""JUnit XML for a bench run, the format lab CI systems (Jenkins, GitLab) read.

One ``<testsuite>`` per bench, one ``<testcase>`` per scenario, classname
``<bench>.<secondary>``; failed scenarios carry ``<failure>``, broken bench
runs ``<error>`` (with the traceback), skipped ones ``<skipped>``. Metrics
(throughput, wire limit) go into ``<properties>`` and the message into
``<system-out>`` so they show up in CI.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from hil.runner import ScenarioResult
from signing.atomic_file import write_atomic


def junit_xml(bench_name: str, results: Sequence[ScenarioResult]) -> bytes:
    suites = ET.Element("testsuites")
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=bench_name,
        tests=str(len(results)),
        failures=str(sum(r.status == "failed" for r in results)),
        errors=str(sum(r.status == "error" for r in results)),
        skipped=str(sum(r.status == "skipped" for r in results)),
        time=f"{sum(r.seconds for r in results):.3f}",
    )
    for result in results:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=f"{bench_name}.{result.secondary}",
            name=result.name,
            time=f"{result.seconds:.3f}",
        )
        if result.metrics:
            properties = ET.SubElement(case, "properties")
            for key, value in sorted(result.metrics.items()):
                ET.SubElement(properties, "property", name=key, value=f"{value:.3f}")
        if result.status == "failed":
            ET.SubElement(
                case, "failure", message=result.message, type=result.kind
            ).text = result.message
        elif result.status == "error":
            ET.SubElement(case, "error", message=result.message).text = (
                result.detail or result.message
            )
        elif result.status == "skipped":
            ET.SubElement(case, "skipped", message=result.message)
        ET.SubElement(case, "system-out").text = result.message
    ET.indent(suites)
    return bytes(ET.tostring(suites, encoding="utf-8", xml_declaration=True)) + b"\n"


def write_junit(path: Path | str, bench_name: str, results: Sequence[ScenarioResult]) -> None:
    write_atomic(path, junit_xml(bench_name, results))
