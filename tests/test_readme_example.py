"""The README's "Add your own unlearner" example runs as written, through `muse run`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from muse_bench.cli import cli

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_plugin_code() -> str:
    """The Python block of the README's "Add your own unlearner" section."""
    section = README.read_text().split("## Add your own unlearner", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def run_args(algo: str, mini_benchmark, out: Path) -> list[str]:
    """`muse run` arguments for one quick epoch of `algo` (beta=3) on the mini benchmark."""
    data, target, retrain = mini_benchmark
    return ["run", "--algo", algo, "--corpus", "news", "--source", str(data),
            "--target", str(target), "--retrain", str(retrain), "--out", str(out),
            "-P", "beta=3", "-P", "epochs=1", "--bootstrap", "20", "--quiet"]  # fmt: skip


def test_readme_plugin_example_runs(mini_benchmark, tmp_path):
    from click.testing import CliRunner

    plugin = tmp_path / "my_unlearner.py"
    plugin.write_text(readme_plugin_code())
    out = tmp_path / "out"
    args = [*run_args(f"{plugin}:MySimNPO", mini_benchmark, out), "-P", "lr=1e-3"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    reports = [json.loads(p.read_text()) for p in out.glob("news/*/*/report.json")]
    (report,) = [r for r in reports if r["algo"] not in ("target", "retrain")]
    assert report["params"]["beta"] == 3.0 and report["params"]["gamma"] == 0.0
    assert report["curve"] and report["selected"] == report["curve"][-1]["label"]


def test_entry_point_plugin_runs_through_muse_run(mini_benchmark, tmp_path):
    """An installed package exposing the README class under the entry-point group."""
    site = tmp_path / "site"
    dist = site / "my_unlearner_pkg-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-unlearner-pkg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[muse_bench.unlearners]\nmy_simnpo = my_unlearner_mod:MySimNPO\n"
    )
    (site / "my_unlearner_mod.py").write_text(readme_plugin_code())
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    muse = Path(sys.executable).parent / "muse"
    proc = subprocess.run(
        [str(muse), *run_args("my_simnpo", mini_benchmark, out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    reports = [json.loads(p.read_text()) for p in out.glob("news/my_simnpo/*/report.json")]
    assert len(reports) == 1 and reports[0]["params"]["beta"] == 3.0
