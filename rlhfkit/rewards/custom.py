"""A user's Python function as a reward: :class:`PythonReward` (``kind: python``,
``function: module:function`` or ``path/to/file.py:function``).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable

from rlhfkit.config import ConfigError, UserError


class PythonReward:
    """A user's function named ``module:function`` (or ``path/to/file.py:function``).

    It is imported only when a config names it. A module not found on ``sys.path`` is looked up in
    the current directory as well (the ``rlhfkit`` console script does not put it on the path);
    the directory is on ``sys.path`` only during that import.
    """

    def __init__(self, spec: str):
        self.spec = spec
        self.name = f"python:{spec}"
        self.fn = load_function(spec)

    def __call__(self, prompts, completions, **columns) -> list[float]:
        return self.fn(prompts, completions, **columns)


def load_function(spec: str) -> Callable:
    """Import ``module:function`` or ``file.py:function`` and return the callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward function '{spec}' must look like module:function")
    try:
        if module_name.endswith(".py"):
            file = Path(module_name)
            if not file.is_file():
                raise UserError(f"reward function '{spec}': file {file} not found")
            mod_spec = importlib.util.spec_from_file_location(f"rlhfkit_user_reward_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name != module_name.split(".")[0] or os.getcwd() in sys.path:
                    raise
                # the working directory only for this import: restored afterwards so that later
                # imports (of anything) do not pick up files that happen to sit in it
                sys.path.insert(0, os.getcwd())
                try:
                    module = importlib.import_module(module_name)
                finally:
                    sys.path.remove(os.getcwd())
    except ImportError as e:
        raise UserError(f"reward function '{spec}': cannot import '{module_name}' ({e})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise UserError(f"reward function '{spec}': module '{module_name}' has no '{attr}'")
    if not callable(fn):
        raise UserError(f"reward function '{spec}': '{attr}' is not callable")
    return fn
