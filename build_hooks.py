"""Build steps that ship ``blockllm_factory.pth`` at the top of site-packages, for regular and editable installs alike.

Python executes ``import`` lines of ``*.pth`` files in site-packages at start-up. Ours imports a tiny module that
registers a lazy import hook: LLaMA-Factory is patched when (and only when) a process imports it, which covers
``llamafactory-cli``, the torchrun children it spawns and the web UI's training processes alike.

- ``pip install .`` (or a wheel): :class:`BuildPyWithPth` puts the file beside the packages in the wheel's root.
- ``pip install -e .``: setuptools' editable wheel maps ``blockllm_factory`` and ``blockllm_factory.patches`` (the
  top-level ``patches/`` folder) to the checkout with its own finder, and :class:`EditableWheelWithPth` adds the same
  ``.pth`` file, so that a checkout's edits are live without a reinstall and the hook still runs in every process.
  ``__editable__.*.pth`` sorts before ``blockllm_factory.pth``, so the package is importable when our line runs.
"""

import os

from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "blockllm_factory.pth"
PTH_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH_NAME)


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH_SOURCE, os.path.join(self.build_lib, PTH_NAME), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]


class EditableWheelWithPth(editable_wheel):
    """An editable wheel only holds setuptools' own ``__editable__`` files; this one also holds our ``.pth``.

    setuptools (64 to 84 at least) writes the editable wheel through a strategy object (``EditableStrategy``);
    wrapping it is the one place where a file can be added to the wheel's root.
    """

    def _select_strategy(self, *args, **kwargs):
        return _WithHookPth(super()._select_strategy(*args, **kwargs))


class _WithHookPth:
    def __init__(self, strategy) -> None:
        self._strategy = strategy

    def __call__(self, wheel, files, mapping):
        result = self._strategy(wheel, files, mapping)
        wheel.write(PTH_SOURCE, PTH_NAME)
        return result

    def __enter__(self):
        self._strategy.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._strategy.__exit__(*exc_info)
