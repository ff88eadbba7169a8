"""A second copy of the kernel modules whose ``@triton.jit`` functions run in the Triton interpreter.

Triton fixes at decoration whether a function is compiled or interpreted (``triton.jit`` reads
``triton.knobs.runtime.interpret``, i.e. ``TRITON_INTERPRET``). CPU tensors need interpreted
kernels, GPU tensors compiled ones, and one process may hold both, in any order. So the kernel
modules are imported twice: normally (``aligner_kernels.forward``, ...), and once more as
``aligner_kernels._interpreted.forward``, ... from the same files while the interpret knob is set, inside
``knobs.runtime.scope()``, which puts the knob and the environment back as they were.

One more thing stands in the way when ``triton`` itself was imported without the interpreter
(the normal case): Triton's own library functions (``tl.sum``, ``tl.max``, ``tl.zeros``,
``tl.cdiv``, ...) are ``@triton.jit`` functions decorated at that import, and the interpreter
cannot call those ("Cannot call @triton.jit'd outside of the scope of a kernel"). The copy
therefore sees ``tl`` through :class:`InterpretedLanguage`, which hands out interpreted twins of
them. When the user set TRITON_INTERPRET=1 before Triton was imported, those library functions are
interpreted already, but the interpreter runs its rewrite of a function in the globals of the
module that defined it (``triton.language.standard``), after copying its own names
(``interpreter_semantic``, ...) into them; the copy gets twins of them as well, so that in either
mode the interpreter writes into the twins' private globals, never into triton.language.

While an interpreted kernel runs, the interpreter replaces triton.language's builtins by its
own; for calls of jitted library functions (the twins) it does not put them back (seen with
Triton 3.9), which would break later compilations. Every interpreted launch therefore runs inside
:func:`language_restored`. Nothing outside the copy is left modified: no environment variable,
knob or Triton module (tests/test_isolation.py checks this).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import sys
import threading
import types

import triton.language as tl
from triton import knobs
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_LOCK = threading.Lock()
_MISSING = object()
# The modules whose attributes the interpreter patches while a kernel runs.
_LANGUAGE_MODULES = (tl, tl.core, tl.math, tl.standard)


# One interpreted launch at a time: the interpreter's patching is process-wide, so two threads
# interleaving their patches and restores would leave patched builtins behind.
_RUN_LOCK = threading.Lock()


@contextlib.contextmanager
def language_restored():
    """Run an interpreted launch; put every attribute of triton.language's modules back as it
    was on entry, except the interpreter's own names (:func:`_rewriter_global`)."""
    with _RUN_LOCK:
        saved = [(module, dict(vars(module))) for module in _LANGUAGE_MODULES]
        try:
            yield
        finally:
            for module, attributes in saved:
                current = vars(module)
                added = [name for name in current if name not in attributes]
                for name in added:
                    if not _rewriter_global(name, current[name]):
                        delattr(module, name)
                for name, value in attributes.items():
                    if current.get(name) is not value:
                        setattr(module, name, value)


def _rewriter_global(name: str, value: object) -> bool:
    """Whether ``name = value``, found in a triton.language module after an interpreted launch, is
    one of the names the interpreter put there to run a function defined in that module: to call
    an interpreted function it execs its rewrite of the function in the function's own globals,
    after copying its module's globals (``interpreter_semantic``, ...) into them, and caches the
    rewrite for the process. That happens to Triton's library functions themselves (``tl.sum``,
    defined in triton.language.standard) in kernel modules decorated while the user's
    TRITON_INTERPRET=1 was set (the copy calls twins instead); deleting those names would leave
    the cached rewrite to fail on its next call with ``NameError: interpreter_semantic``."""
    return vars(interpreter).get(name, _MISSING) is value


class InterpretedLanguage(types.ModuleType):
    """``triton.language`` as the interpreted copy sees it: every attribute is the real one,
    except Triton's own jitted library functions (compiled ones, or interpreted ones when the user
    set TRITON_INTERPRET=1), which come as interpreted twins with globals of their own."""

    def __init__(self) -> None:
        super().__init__(tl.__name__, tl.__doc__)
        self._twins: dict[str, InterpretedFunction] = {}

    def __getattr__(self, name: str):
        value = getattr(tl, name)
        if not isinstance(value, (JITFunction, InterpretedFunction)):
            return value
        twin = self._twins.get(name)
        if twin is None:
            fn = value.fn
            # The interpreter executes its rewrite of a function in the function's globals and
            # adds its own names there: give the twin a copy, so triton.language stays untouched.
            clone = types.FunctionType(
                fn.__code__, dict(fn.__globals__), fn.__name__, fn.__defaults__, fn.__closure__
            )
            clone.__kwdefaults__ = fn.__kwdefaults__
            twin = self._twins[name] = InterpretedFunction(clone)
        return twin


def interpreted_package(package: types.ModuleType, modules: tuple[str, ...]) -> types.ModuleType:
    """``{package}._interpreted``, holding interpreted copies of ``package``'s ``modules``,
    imported on the first call."""
    name = f"{package.__name__}._interpreted"
    with _LOCK:
        copy = sys.modules.get(name)
        if copy is None:
            copy = _import_copy(package, name, modules)
    return copy


def _import_copy(package: types.ModuleType, name: str, modules: tuple[str, ...]) -> types.ModuleType:
    copy = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
    copy.__path__ = list(package.__path__)  # the same files; relative imports stay inside the copy
    sys.modules[name] = copy
    sys.modules[f"{name}.{__name__.rpartition('.')[2]}"] = sys.modules[__name__]  # this module: one copy
    try:
        with knobs.runtime.scope():
            knobs.runtime.interpret = True
            for module in modules:
                importlib.import_module(f"{name}.{module}")
    except BaseException:
        for key in [key for key in sys.modules if key == name or key.startswith(f"{name}.")]:
            del sys.modules[key]
        raise
    language = InterpretedLanguage()
    copies = [sys.modules[key] for key in list(sys.modules) if key.startswith(f"{name}.")]
    for module in copies:
        if module.__name__.startswith(f"{name}.") and module.__dict__.get("tl") is tl:
            module.tl = language
            # The interpreter patches triton.language while a kernel runs and finds it through
            # the kernel's globals.
            module._triton_language = tl
    return copy
