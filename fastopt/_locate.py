"""Find the compiled extension when ``fastopt`` is imported from a source checkout.

``python -m fastopt ...`` run from the repository root imports the source folder (the
current directory comes first on sys.path), which has no compiled ``_kernels``. When that
happens and an installed copy of fastopt is on sys.path, its folder is added to the
package's ``__path__`` so ``fastopt._kernels`` resolves to the installed build.
"""
import os
import sys


def _has_extension(folder):
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(n.startswith("_kernels.") and n.endswith((".so", ".pyd")) for n in names)


def extend_path(package_path):
    here = os.path.realpath(package_path[0])
    if _has_extension(here):
        return
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "fastopt")
        if os.path.realpath(candidate) != here and _has_extension(candidate):
            package_path.append(candidate)
            return
