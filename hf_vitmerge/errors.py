"""The package's error classes: what the command line reports as a one-paragraph user error.

Everything hf_vitmerge raises for a bad input derives from :class:`HFVitMergeError`; the
command line catches these (and nothing else of its own), so any other exception is a bug and
shows its traceback. Input errors also derive from ``ValueError`` (the Python habit for a bad
argument, and what code written against earlier versions catches).

* :class:`InputError`: a model, dataset, path, device or argument is wrong (``ValueError``);
* :class:`ConfigError`: a merge config is invalid (an ``InputError``);
* :class:`OutputError`: the output cannot be written there (an ``InputError``; the
  "already exists" case is also a ``FileExistsError``).

``hf_vitmerge.loading.ModelLoadError``, ``hf_vitmerge.data.DataError``,
``hf_vitmerge.suite.SuiteError`` and ``hf_vitmerge.arch.IncompatibleModelError`` are input
errors; ``hf_vitmerge.hub.PushError`` (the upload failed, the folder is intact) is an
``HFVitMergeError`` and a ``RuntimeError``.
"""

from __future__ import annotations


class HFVitMergeError(Exception):
    """Base class of every error hf_vitmerge raises on purpose."""


class InputError(HFVitMergeError, ValueError):
    """A model, dataset, path, device or argument given to hf_vitmerge is wrong."""


class ConfigError(InputError):
    """A merge config is invalid; the message names the key and what to do."""


class OutputError(InputError):
    """The output cannot be written where it was asked for."""


class OutputExistsError(OutputError, FileExistsError):
    """The output folder already exists and ``overwrite`` was not given."""


__all__ = ["ConfigError", "HFVitMergeError", "InputError", "OutputError", "OutputExistsError"]
