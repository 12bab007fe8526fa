"""The documentation: the README stays short and shares its test command with CI, and the flag reference
(generated at docs build time by docs/hooks/flag_reference.py from the parsers) has help text for every flag."""
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "flag_reference.py"
TEST_COMMAND = 'pip install -e ".[test]" && python -m pytest -q'


@pytest.fixture(scope="module")
def hook():
    return runpy.run_path(str(HOOK))


def test_every_flag_has_help_text(hook):
    new = {cmd: flags for cmd, flags in hook["missing_help"]().items() if flags}
    assert not new, f"flags without help= (the generated flag reference would leave them blank): {new}"


def test_flag_reference_lists_every_command_line(hook):
    page = hook["render"]()
    for cmd in ("sdlora train text-to-image", "sdlora train dreambooth", "sdlora generate", "sdlora convert"):
        assert f"## `{cmd}`" in page
    assert "| `--learning_rate` |" in page and "| `--instance_prompt` |" in page
    assert (ROOT / "docs" / "flags.md").read_text().count(hook["MARKER"]) == 1


def test_readme_is_short_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    assert TEST_COMMAND in readme and TEST_COMMAND in (ROOT / ".ci" / "run").read_text()
    assert "pip install sdlora" not in readme  # not published
