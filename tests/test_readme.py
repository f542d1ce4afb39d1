"""README starts with the two set-up commands, CI runs the README's test command verbatim, and the
tour's listing of published detectors is the registry's."""

from __future__ import annotations

import ast
from pathlib import Path

import fusionzoo as fz

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.strip().splitlines() if line.strip()]


def test_readme_starts_with_run_and_test_commands() -> None:
    run, test = readme_commands()
    assert run == "pip install -e . && python train.py"
    assert test == 'pip install -e ".[dev]" && pytest'


def test_ci_runs_the_readme_test_command() -> None:
    _, test = readme_commands()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test in ci_lines


def test_tour_lists_the_published_detectors_the_registry_has() -> None:
    text = (ROOT / "README.md").read_text()
    call = 'fz.list_models(task="detection", published=True)'
    after = text[text.index(call):].splitlines()[1:]
    listed = "".join(line.lstrip("# ").strip() for line in after[:2])
    assert ast.literal_eval(listed) == fz.list_models(task="detection", published=True)
