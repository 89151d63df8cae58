"""docs/example.py keeps working (run on a tiny model)."""
import runpy
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "example.py"


def test_the_example_runs(tiny_gguf, capsys):
    runpy.run_path(str(EXAMPLE))["main"](str(tiny_gguf("gemma3", "F32")))
    out = capsys.readouterr().out
    assert "sequence 2 holds positions 0 to" in out
    assert "restored sequence 0 goes on:" in out
    assert [line[:8] for line in out.splitlines() if line.startswith("branch")] == \
        ["branch 0", "branch 1", "branch 2"]
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("served")] == \
        ["served 0", "served 1", "served 2", "served 3"]
