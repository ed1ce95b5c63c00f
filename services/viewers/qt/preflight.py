"""What the Qt viewer checks before it makes its QApplication: a display to draw on, and
bindings that will not crash it. Each failure is a GymbusError saying what to do instead, so
that `gymbus viewer` exits with one readable line rather than Qt's own abort."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from PySide6 import QtCore

from gymbus.shared.errors import ExitCode, GymbusError


class NoDisplay(GymbusError):
    """There is no display to open a window on. Run the viewer in a desktop session (or over
    `ssh -X`), or watch the runs in the terminal with `gymbus watch`."""

    exit_code = ExitCode.BAD_INPUT


#: QT_QPA_PLATFORM values that draw on a display; the others (offscreen, vnc, eglfs, ...) need none
DISPLAY_PLATFORMS = ("xcb", "wayland")


def check_display(environ: Mapping[str, str] = os.environ, platform: str = sys.platform) -> None:
    """Raise NoDisplay where Qt would find no display and abort the process (Linux: neither
    DISPLAY nor WAYLAND_DISPLAY set, and no QT_QPA_PLATFORM that needs none). Checked before the
    QApplication is made: Qt's own message on abort advises reinstalling, which does not help."""
    if not platform.startswith("linux") or environ.get("DISPLAY") or environ.get(
            "WAYLAND_DISPLAY"):
        return
    qpa = environ.get("QT_QPA_PLATFORM", "")
    if qpa and not qpa.split(":")[0].startswith(DISPLAY_PLATFORMS):
        return
    platform_said = f"QT_QPA_PLATFORM is {qpa}" if qpa else "QT_QPA_PLATFORM is not offscreen"
    raise NoDisplay(
        f"no display: DISPLAY and WAYLAND_DISPLAY are unset and {platform_said}, so the Qt "
        "viewer cannot open a window. Watch the runs in this terminal with `gymbus watch`, or "
        "run the viewer in a desktop session (or over `ssh -X`)")


class BrokenBindings(GymbusError):
    """The installed PySide6 would crash the viewer; install the version `gymbus[qt]` pins."""

    exit_code = 2


def bindings_broken() -> bool:
    """Whether these bindings drop a reference to None at every call of a method that returns
    nothing (PySide6 6.12.0 on Python 3.11): the process aborts with `none_dealloc` once None's
    count reaches zero. Measured, not guessed from the version: 100 calls, None's count after."""
    if sys.version_info >= (3, 12):
        return False  # None is immortal there
    rect = QtCore.QRectF()
    before = sys.getrefcount(None)
    for _ in range(100):
        rect.adjust(0, 0, 0, 0)
    return sys.getrefcount(None) < before - 50


def check_bindings() -> None:
    """Raise BrokenBindings, saying what to install, when `bindings_broken()`."""
    if bindings_broken():
        import PySide6

        raise BrokenBindings(
            f"PySide6 {PySide6.__version__} on Python {sys.version.split()[0]} loses a reference "
            "to None at every call and would crash the viewer; install PySide6-Essentials<6.12 "
            "(pip install 'gymbus[qt]' pins it)")
