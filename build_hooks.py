"""Build step that ships ``blockllm_factory.pth`` at the top of site-packages.

Python executes ``import`` lines of ``*.pth`` files in site-packages at start-up. Ours imports a tiny module that
registers a lazy import hook: LLaMA-Factory is patched when (and only when) a process imports it, which covers
``llamafactory-cli``, the torchrun children it spawns and the web UI's training processes alike.
"""

import os

from setuptools.command.build_py import build_py

PTH_NAME = "blockllm_factory.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        source = os.path.join(os.path.dirname(os.path.abspath(__file__)), PTH_NAME)
        self.copy_file(source, os.path.join(self.build_lib, PTH_NAME), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH_NAME)]
