"""The README's Python examples run as written (on tiny local models standing in for real ones)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import make_vit

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) >= 2 and "hv.merge(" in blocks[0] and "hv.run_merge(" in blocks[1]
    base = make_vit(tmp_path / "vit-base", labels=("x", "y"), seed=0)
    for i, (name, labels) in enumerate(
        {
            "vit-pets": ("cat", "dog"),
            "vit-cars": ("car", "bus"),
            "vit-flowers": ("rose", "tulip", "daisy"),
        }.items()
    ):
        make_vit(tmp_path / name, labels=labels, seed=10 + i, base=base)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102  (the README's own code)
    out = capsys.readouterr().out
    assert "ViTForImageClassification 7" in out and "'label':" in out
    for folder in (tmp_path / "merged", tmp_path / "out" / "ties"):
        for name in ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"):
            assert (folder / name).is_file(), folder / name
