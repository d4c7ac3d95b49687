"""Sending a notebook's function to ranks that were not forked from the
notebook: serialised by value with cloudpickle (its code, the notebook
variables and closures it uses, the classes it builds), and loaded by the rank
(``python -m ddlkit.worker --pickled FILE``).

This is how a function defined in a notebook runs once forking the kernel is
unsafe (CUDA is initialised in it) or impossible (no ``os.fork``): the ranks
come from the warm starter (``ddlkit.kernel.forkserver``) or fresh
interpreters instead. Something that cannot travel (a lock, an open socket or
file) is named in a ValueError before anything starts.

The file holds two pickles: the kernel's ``sys.path``, then the function and
its arguments. cloudpickle sends a function of an importable module by
reference (its name), so the rank takes the kernel's import path before it
loads the function: a module the notebook imports from a folder it added to
``sys.path`` imports in the ranks too, as it would in ranks forked from it.

The file lies in the run's folder, which only its owner can write
(``ddlkit.files``): nobody else can plant a pickle for the ranks to load.
"""

from __future__ import annotations

import inspect
import pickle
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle

_DEPTH = 4  # how deep to look for the culprit: function -> helper -> class -> method


def pickle_function(function: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """The kernel's ``sys.path`` and ``(function, args)`` serialised by value,
    or a ValueError naming what cannot be.

    >>> import io
    >>> scale = 3
    >>> file = io.BytesIO(pickle_function(lambda x: x * scale, (2,)))
    >>> pickle.load(file) == sys.path
    True
    >>> fn, args = pickle.load(file)
    >>> fn(*args)
    6
    >>> import threading
    >>> guard = threading.Lock()
    >>> pickle_function(lambda: guard.locked(), ())
    Traceback (most recent call last):
    ...
    ValueError: the function <lambda> uses 'guard' (a lock), which cannot be sent to the ranks ...
    """
    try:
        return pickle.dumps(list(sys.path)) + cloudpickle.dumps((function, args))
    except Exception as exc:
        problem = exc
    name = getattr(function, "__qualname__", repr(function))
    for i, arg in enumerate(args):
        if _culprit(arg, f"argument {i + 1}", 0) is not None:
            raise ValueError(
                f"argument {i + 1} of {name} ({_kind(arg)}) cannot be sent to the ranks ({problem}): "
                "pass something picklable, or create it inside the function"
            ) from None
    found = _culprit(function, name, 0)
    uses = f"uses {found[0]!r} ({_kind(found[1])})" if found and found[0] != name else "cannot be serialised"
    raise ValueError(
        f"the function {name} {uses}, which cannot be sent to the ranks ({problem}). They run in processes "
        "of their own (CUDA is initialised in this kernel, or this platform cannot fork, or start= asked "
        "for it): create such objects inside the function, or pass what they are made from"
    ) from None


def _culprit(obj: Any, name: str, depth: int) -> tuple[str, Any] | None:
    """(name, object) of the innermost thing that cannot be pickled, None if ``obj`` can."""
    try:
        cloudpickle.dumps(obj)
        return None
    except Exception:
        pass
    if depth < _DEPTH:
        for inner_name, inner in _parts(obj):
            found = _culprit(inner, inner_name, depth + 1)
            if found is not None:
                return found
    return name, obj


def _parts(obj: Any) -> list[tuple[str, Any]]:
    """What a function or class carries along when pickled by value."""
    if inspect.isfunction(obj):
        captured = inspect.getclosurevars(obj)
        values = {**captured.globals, **captured.nonlocals}
        defaults = list(obj.__defaults__ or ()) + list((obj.__kwdefaults__ or {}).values())
        return [*values.items(), *((f"a default of {obj.__qualname__}", d) for d in defaults)]
    if inspect.isclass(obj):
        return [(f"{obj.__qualname__}.{k}", v) for k, v in vars(obj).items() if not k.startswith("__")]
    return []


def _kind(obj: Any) -> str:
    kind = type(obj).__name__
    return "a lock" if kind in ("lock", "RLock") else f"a {type(obj).__module__}.{kind}"
