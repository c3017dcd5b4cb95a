"""Reading ``suite.json`` (INTERFACES.md section 2): tasks, their models, labels and data."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


class SuiteError(InputError):
    """A suite.json is missing or malformed."""


@dataclass(frozen=True)
class SuiteTask:
    name: str
    model: Path
    labels: tuple[str, ...]
    train: Path
    test: Path
    image_column: str = "image"
    label_column: str = "label"


@dataclass(frozen=True)
class Suite:
    name: str
    init: str
    base_model: Path | None
    tasks: tuple[SuiteTask, ...]
    path: Path

    @property
    def shared_labels(self) -> bool:
        return all(t.labels == self.tasks[0].labels for t in self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def task(self, name: str) -> SuiteTask:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SuiteError(f"suite {self.name!r} has no task {name!r}; tasks: {self.task_names}")


def load_suite(path: str | os.PathLike) -> Suite:
    """Parse a suite.json; paths in it are relative to its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "suite.json"
    if not path.is_file():
        raise SuiteError(
            f"suite file {path} does not exist. Build one with `hf-vitmerge zoo build SUITE --out DIR`."
        )
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SuiteError(f"suite file {path} is not valid JSON: {err}") from err
    root = path.parent
    try:
        tasks = tuple(
            SuiteTask(
                name=t["name"],
                model=root / t["model"],
                labels=tuple(str(x) for x in t["labels"]),
                train=root / t["train"],
                test=root / t["test"],
                image_column=t.get("image_column", "image"),
                label_column=t.get("label_column", "label"),
            )
            for t in raw["tasks"]
        )
        base = raw.get("base_model")
        return Suite(raw["name"], raw.get("init", "shared"), root / base if base else None, tasks, path)
    except (KeyError, TypeError) as err:
        raise SuiteError(f"suite file {path} lacks a required field: {err}") from err
