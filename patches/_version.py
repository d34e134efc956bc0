"""The LLaMA-Factory versions these patches were written and tested against, checked before anything is changed."""

import sys

# Every patch reaches into LLaMA-Factory internals (module-level functions, dataclass fields, trainer methods) that
# move between minor releases, so only the tested release line is accepted.
SUPPORTED_MIN = (0, 9, 5)
SUPPORTED_BELOW = (0, 9, 6)
SUPPORTED_RANGE = ">=0.9.5,<0.9.6"


def _parse(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split(".")[:3]:
        digits = ""
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        numbers.append(int(digits))
    return tuple(numbers)


def installed_llamafactory_version() -> str:
    package = sys.modules.get("llamafactory")
    version = getattr(package, "__version__", None)
    if version is None:
        from importlib.metadata import version as distribution_version

        version = distribution_version("llamafactory")
    return str(version)


def check_llamafactory_version(version: str | None = None) -> str:
    """Returns the installed version, or raises ``RuntimeError`` naming the supported range."""
    version = installed_llamafactory_version() if version is None else version
    if not SUPPORTED_MIN <= _parse(version) < SUPPORTED_BELOW:
        raise RuntimeError(
            f"llamafactory {version} is not supported by blockllm-factory (supported: llamafactory{SUPPORTED_RANGE})"
        )
    return version
