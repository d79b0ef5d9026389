"""Version ranges the compat modules were tested with, checked before a private name is used."""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version


class UntestedVersionError(RuntimeError):
    """A private API of a library is needed, but the installed version is outside the tested range."""


def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


@functools.cache
def require_tested(package: str, lowest: str, below: str, what: str) -> str:
    """The installed version of ``package``; an :class:`UntestedVersionError` naming it when it is not
    in [``lowest``, ``below``), the range in which ``what`` (a private API use) was tested."""
    try:
        installed = version(package)
    except PackageNotFoundError:
        raise UntestedVersionError(f"{what} needs {package} >= {lowest}, < {below}; it is not installed") from None
    if not _release(lowest) <= _release(installed) < _release(below):
        raise UntestedVersionError(
            f"{what} uses a private API of {package} tested with {lowest} <= version < {below}; "
            f"{package} {installed} is installed: pip install '{package}>={lowest},<{below}'"
        )
    return installed
