"""The oldest LLaMA-Factory these patches were written for; newer releases are accepted when their surfaces match.

Whether a newer LLaMA-Factory (or transformers, accelerate, DeepSpeed, gradio) still offers what each patch reads or
replaces is decided by :mod:`._surfaces`, which checks the functions, fields and parameters themselves before a patch
changes anything. The version number only excludes releases older than the one the patches were written against.
"""

import sys

from packaging.version import InvalidVersion, Version

MINIMUM = "0.9.5"
SUPPORTED_RANGE = f">={MINIMUM}"


def installed_version(distribution: str) -> str:
    """The installed version of ``distribution`` (its module's ``__version__`` when already imported)."""
    package = sys.modules.get(distribution.replace("-", "_"))
    version = getattr(package, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as distribution_version

        try:
            version = distribution_version(distribution)
        except PackageNotFoundError:
            return "(not installed)"
    return str(version)


def installed_llamafactory_version() -> str:
    return installed_version("llamafactory")


def check_llamafactory_version(version: str | None = None) -> str:
    """Returns the installed version, or raises ``RuntimeError`` when it is older than :data:`MINIMUM`."""
    version = installed_llamafactory_version() if version is None else version
    try:
        # A pre-release of the minimum (0.9.5.dev0) is the code the minimum was released from.
        too_old = Version(version).release < Version(MINIMUM).release
    except InvalidVersion:
        too_old = True
    if too_old:
        raise RuntimeError(
            f"llamafactory {version} is older than blockllm-factory supports (llamafactory{SUPPORTED_RANGE}); "
            "upgrade LLaMA-Factory."
        )
    return version
