"""Import the user's reward functions: "file.py:function" paths (a file inside a package
is imported as its module, so relative imports work) and "package.module:function" paths."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from grouprl.registry import did_you_mean


def split_path(path: str) -> tuple[str, str]:
    """'some/file.py:fn' -> ('some/file.py', 'fn'); the last colon splits (Windows drives)."""
    file, sep, fn = path.rpartition(":")
    if not sep or not file or not fn:
        raise ValueError(
            f"reward path {path!r} must look like 'some/file.py:function_name' or "
            "'package.module:function_name'"
        )
    return file, fn


def load_callable(path: str) -> tuple[Callable, str]:
    """The function a "file.py:function" or "package.module:function" path names, and the
    path as shown in messages."""
    file, fn_name = split_path(path)
    if file.endswith(".py") or Path(file).expanduser().is_file():
        return _load_from_file(file, fn_name), f"{file}:{fn_name}"
    try:
        module = importlib.import_module(file)
    except ImportError as exc:
        raise ValueError(
            f"reward {path!r}: cannot import module {file!r} ({exc}); a file needs its .py"
        ) from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ValueError(
            f"reward {path!r}: module {file!r} has no function {fn_name!r}"
            f"{did_you_mean(fn_name, names)}"
        )
    return fn, path


_MODULES: dict[Path, ModuleType] = {}  # one import per file, shared by its functions


def _load_from_file(file: str, fn_name: str) -> Callable:
    path = Path(file).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    if not path.is_file():
        raise ValueError(f"{file}: reward file not found (looked at {path})")
    module = _MODULES.get(path)
    if module is None:
        module = _import_file(file, path)
        _MODULES[path] = module
    functions = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        what = "no function" if fn is None else "not a function:"
        raise ValueError(
            f"{file}: {what} {fn_name!r}{did_you_mean(fn_name, functions)}; "
            f"functions in the file: {', '.join(functions) or 'none'}"
        )
    return fn


def _import_file(file: str, path: Path) -> ModuleType:
    """Import a reward file. One inside a package (its folder has `__init__.py`) is imported
    as that package's module, so its relative imports work; any other under a unique name,
    so two "rewards.py" in different folders coexist."""
    root = path.parent
    while (root / "__init__.py").is_file():
        root = root.parent
    if root != path.parent:
        dotted = ".".join(path.relative_to(root).with_suffix("").parts)
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            return importlib.import_module(dotted)
        except Exception as e:
            raise ValueError(f"{file}: error while importing: {type(e).__name__}: {e}") from e
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"grouprl_user_rewards.{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{file}: cannot import this file as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        raise ValueError(f"{file}: error while importing: {type(e).__name__}: {e}") from e
    return module
