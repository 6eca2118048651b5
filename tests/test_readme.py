"""The README must stay true: every `make` target, CLI command and flag it names exists, its
links resolve, its Python imports import, the code blocks marked `<!-- runnable -->` run, and
docs/api.md (the reference it points to) is what the models generate."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

import apidocs
import demo
from kafka_retry.cli import build_parser as cli_parser
from kafka_retry_operator.main import build_parser as operator_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
TEXT = README.read_text()
BIN = Path(sys.executable).parent
FENCE = re.compile(r"(?:<!-- (runnable[^>]*) -->\n)?```(\w*)\n(.*?)```", re.S)


def _blocks() -> list[tuple[str, str, str]]:
    """(marker, language, body) of every fenced block; marker is '' unless runnable."""
    return [(m.group(1) or "", m.group(2), m.group(3)) for m in FENCE.finditer(TEXT)]


def _commands() -> Iterator[list[str]]:
    """Command lines from shell blocks and inline code spans, split into words; comments,
    continuation lines and `$ ` prompts handled."""
    for _, lang, body in _blocks():
        if lang != "sh":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                yield shlex.split(line, comments=True)
    prose = FENCE.sub("", TEXT)
    for span in re.findall(r"`([^`\n]+)`", prose):
        try:
            yield shlex.split(span.removeprefix("$ "))
        except ValueError:
            continue  # not a command: `"$(make -s env)"` and the like


def _make_targets() -> set[str]:
    out = subprocess.run(
        ["make", "--no-print-directory", "help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_every_make_target_named_exists() -> None:
    targets = _make_targets()
    named = set()
    for words in _commands():
        if words[:1] == ["make"]:
            named |= {w for w in words[1:] if not w.startswith("-") and "=" not in w}
    assert {"demo", "test", "demo-down", "kind", "docs", "up", "down"} <= named
    assert named <= targets, f"the README names make targets that do not exist: {named - targets}"


def _walk(parser: argparse.ArgumentParser, words: list[str]) -> tuple[list[str], list[str]]:
    """Follow `words` through sub-commands; answers (the sub-command path, flags not found)."""
    path: list[str] = []
    missing: list[str] = []
    for word in words:
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            if flag not in parser._option_string_actions:
                missing.append(f"{' '.join(path)} {flag}".strip())
            continue
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if subs and word in subs[0].choices:
            parser = subs[0].choices[word]
            path.append(word)
        elif subs:
            missing.append(f"{' '.join(path)} {word} (no such command)".strip())
            break
    return path, missing


def _cli_words() -> Iterator[tuple[str, list[str]]]:
    """(program, arguments) for every invocation of our own programs in the README."""
    for words in _commands():
        words = [w for w in words if w != "..."]  # `kubectl retry ...`: any command
        if not words:
            continue
        if words[0] in ("kafka-retry", "kubectl-retry"):
            yield "kafka-retry", words[1:]
        elif words[:2] == ["kubectl", "retry"]:
            yield "kafka-retry", words[2:]
        elif words[0] == "kafka-retry-operator":
            yield "kafka-retry-operator", words[1:]
        elif "hack/demo.py" in words[:2]:
            yield "demo", words[words.index("hack/demo.py") + 1 :]
        elif words[:2] == ["make", "demo"]:
            args = [w.split("=", 1)[1] for w in words if w.startswith("DEMO_ARGS=")]
            yield "demo", [a for arg in args for a in shlex.split(arg)]


def test_every_cli_command_and_flag_named_exists() -> None:
    parsers = {
        "kafka-retry": cli_parser(),
        "kafka-retry-operator": operator_parser(),
        "demo": demo.build_parser(),
    }
    seen: set[str] = set()
    problems = []
    for program, words in _cli_words():
        path, missing = _walk(parsers[program], words)
        seen.add(" ".join([program, *path]))
        problems += [f"{program} {m}" for m in missing]
    assert not problems, problems
    for expected in ("kafka-retry dlq replay", "kafka-retry dlq list", "kafka-retry status"):
        assert expected in seen


def test_every_helm_value_set_exists() -> None:
    values = yaml.safe_load((ROOT / "charts/kafka-retry-operator/values.yaml").read_text())
    keys = []
    for words in _commands():
        if words[:1] == ["helm"]:
            keys += [words[i + 1].split("=", 1)[0] for i, w in enumerate(words) if w == "--set"]
    assert keys, "the README installs the chart with --set values"
    for key in keys:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"--set {key}: not in values.yaml"
            node = node[part]


def test_links_resolve() -> None:
    for target in re.findall(r"\]\(([^)#]+)\)", TEXT):
        if "://" not in target:
            assert (ROOT / target).exists(), f"README links to a missing {target}"


def test_python_snippets_import() -> None:
    """The SDK example's imports are real (its body needs a cluster to run)."""
    imports = [
        line
        for _, lang, body in _blocks()
        if lang == "python"
        for line in body.splitlines()
        if line.startswith(("from ", "import "))
    ]
    assert imports
    subprocess.run([sys.executable, "-c", "\n".join(imports)], check=True, cwd=ROOT)


def test_api_reference_matches_the_models() -> None:
    current = (ROOT / "docs" / "api.md").read_text()
    assert current == apidocs.render(), "docs/api.md is out of date: run `make docs`"
    for field in ("delaySeconds", "deletionPolicy", "maxMessagesPerSecond", "targetTier"):
        assert f".{field}`" in current or f"`{field}`" in current


def _run_block(body: str, env: dict[str, str]) -> None:
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", body],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, f"README block failed:\n{body}\n{proc.stdout}\n{proc.stderr}"


# The variables that pick this machine's set of local servers (each checkout of a shared
# machine may use its own); everything else of ours a fresh shell would not have.
SERVER_SET = ("KRO_RUN", "KRO_KAFKA_PORT", "KRO_ETCD_PORT", "KRO_APISERVER_PORT", "KRO_NODE")


def _env() -> dict[str, str]:
    """A fresh shell's environment: none of this project's commands on PATH (the blocks
    must put them there themselves, as a reader does), no KUBECONFIG."""
    ours = ("kafka-retry", "kubectl-retry")
    path = [
        d
        for d in os.environ["PATH"].split(os.pathsep)
        if d and Path(d) != BIN and not any((Path(d) / c).exists() for c in ours)
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KRO_", "KUBECONFIG"))}
    env |= {k: os.environ[k] for k in SERVER_SET if k in os.environ}
    return {**env, "PATH": os.pathsep.join(path)}


def test_a_fresh_shell_has_none_of_our_commands() -> None:
    """So the runnable blocks below prove that the README's own steps put them on PATH."""
    proc = subprocess.run(["bash", "-c", "command -v kafka-retry kubectl-retry"], env=_env())
    assert proc.returncode != 0


@pytest.mark.parametrize(
    "body", [b for m, lang, b in _blocks() if m == "runnable" and lang == "sh"]
)
def test_runnable_blocks_run(body: str) -> None:
    _run_block(body, _env())


def test_runnable_blocks_against_the_local_servers(kubeconfig: str) -> None:
    """Blocks marked `runnable: local servers` (the kubeconfig fixture starts them)."""
    bodies = [b for m, lang, b in _blocks() if m == "runnable: local servers" and lang == "sh"]
    assert bodies
    for body in bodies:
        _run_block(body, _env())


def test_metrics_named_exist() -> None:
    """The metrics table lists what a worker exposes (names as Prometheus sees them)."""
    from prometheus_client import REGISTRY, generate_latest

    from kafka_retry.metrics import StageMetrics

    StageMetrics("readme/check", "retry-1")  # label sets appear once used
    exposed = {
        line.split("{")[0].split(" ")[0]
        for line in generate_latest(REGISTRY).decode().splitlines()
        if not line.startswith("#")
    }
    named = set(re.findall(r"^\| `(kafka_retry_[a-z_]+)` \|", TEXT, re.M))
    assert len(named) >= 6
    for name in named:
        assert {name, f"{name}_bucket"} & exposed, f"README names metric {name}; not exposed"


def test_demo_summary_sample_is_what_the_example_mix_gives() -> None:
    """The README's sample summary is a real run's: its counts are what the example service's
    orders (examples/order_service/orders.py) give for that many orders, with nothing lost,
    the DLQ empty again and no tier event early. (How late they were is held to the README's
    words by tests/test_demo.py.)"""
    from order_service.orders import order_events

    block = re.search(r"<!-- demo summary -->\n```\n(.*?)```", TEXT, re.S)
    assert block, "the README shows a demo summary"
    text = block.group(1)

    def number(label: str) -> int:
        found = re.search(rf"^  {label}\s+(\d+)", text, re.M)
        assert found, f"no {label!r} line in the sample summary"
        return int(found.group(1))

    produced = number("orders produced")
    kinds = [(order["coupon"] == "SAVE15%" and "bug") or order["bank"]
             for _, order in order_events(produced)]  # fmt: skip
    retry1, retry2, bug = kinds.count("northwind"), kinds.count("fabrikam"), kinds.count("bug")
    assert number("charged on the first try") == produced - retry1 - retry2 - bug
    assert number("charged after a retry") == retry1 + retry2
    assert f"(retry-1 {retry1} · retry-2 {retry2})" in text
    assert number("dead-lettered") == bug == number("charged after the replay")
    assert number("lost") == 0 and number("duplicate deliveries") == 0
    assert number("DLQ depth now") == 0
    assert re.search(r"p50 [\d.]+s · max [\d.]+s · none early", text)
    summary = json.loads(text.strip().splitlines()[-1].replace(", ...}", "}"))
    assert summary["events"] == produced and summary["handled_first_time"] == (
        produced - retry1 - retry2 - bug
    )


def lateness_claim() -> tuple[float, float]:
    """(p50, max) in seconds that the README promises for the demo's tier events."""
    found = re.search(r"p50 under ([\d.]+) s and\s+max under ([\d.]+) s", TEXT)
    assert found, "the README states how late tier events are handled"
    return float(found.group(1)), float(found.group(2))


def test_the_lateness_claim_is_stated() -> None:
    p50, worst = lateness_claim()
    assert 0 < p50 <= worst
