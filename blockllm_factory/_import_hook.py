"""Applies :mod:`blockllm_factory.patches` to LLaMA-Factory as its modules are imported, in every Python process.

``blockllm_factory.pth`` (site-packages) calls :func:`install` at interpreter start-up. That only puts a small finder
at the front of ``sys.meta_path``: it answers ``None`` (one dict lookup) for every module except those in
:data:`WATCHED`. For a watched module it lets the regular finders locate it and wraps the loader's ``exec_module`` so
that, once the module has finished executing, the patch module's ``apply(module)`` runs. Patching at that moment, and
not later, matters: sibling modules copy names with ``from .x import y`` right after, so they see the patched objects.

Start-up cost: this file imports ``sys`` and ``os`` only (both loaded by ``site`` already); nothing from torch or
LLaMA-Factory is imported until a process imports LLaMA-Factory itself.

Compatibility: before a patch runs, ``blockllm_factory.patches._surfaces.check_surfaces`` checks that the module (and
the library internals the patch touches) still has every function, field and parameter the patch relies on; a
LLaMA-Factory release is accepted or refused by that, not by its version number.

Safety: a failing patch never breaks a start or an import. The first failure is reported once on stderr, later watched
modules are left unpatched, and :data:`failures` lets ``finetuning_type: blockllm`` refuse to run on a half-patched
LLaMA-Factory instead of silently training with something else (where the arguments themselves could not be patched,
a stand-in accepts ``blockllm`` only to refuse it with that reason). ``BLOCKLLM_FACTORY_DISABLE=1`` turns the hook off.
"""

import os
import sys

DISABLE_ENV = "BLOCKLLM_FACTORY_DISABLE"

# LLaMA-Factory module -> patch module whose ``apply(module)`` runs right after it executes. Add surfaces here.
WATCHED: dict[str, str] = {
    "llamafactory.hparams.finetuning_args": "blockllm_factory.patches.arguments",
    "llamafactory.hparams.parser": "blockllm_factory.patches.parser",
    "llamafactory.model.adapter": "blockllm_factory.patches.adapter",
    "llamafactory.model.model_utils.checkpointing": "blockllm_factory.patches.layer_checkpointing",
    "llamafactory.train.trainer_utils": "blockllm_factory.patches.optimizer",
    "llamafactory.train.pt.trainer": "blockllm_factory.patches.trainer",
    "llamafactory.train.sft.trainer": "blockllm_factory.patches.trainer",
    "llamafactory.train.rm.trainer": "blockllm_factory.patches.trainer",
    "llamafactory.train.dpo.trainer": "blockllm_factory.patches.trainer",
    "llamafactory.train.kto.trainer": "blockllm_factory.patches.trainer",
    "llamafactory.train.tuner": "blockllm_factory.patches.metrics",
    "llamafactory.webui.locales": "blockllm_factory.patches.webui_locales",
    "llamafactory.webui.components.top": "blockllm_factory.patches.webui",
    "llamafactory.webui.components.train": "blockllm_factory.patches.webui",
    "llamafactory.webui.runner": "blockllm_factory.patches.webui",
}

ARGUMENTS_MODULE = "llamafactory.hparams.finetuning_args"

# Watched module -> error message of a patch that failed (or was skipped after an earlier failure).
failures: dict[str, str] = {}
# Watched modules whose patch was applied in this process.
applied: list[str] = []


def _disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _report(fullname: str, error: BaseException) -> None:
    message = f"{type(error).__name__}: {error}"
    first = not failures
    failures[fullname] = message
    if first:  # once per process: later watched modules are skipped silently
        print(
            f"blockllm-factory: could not patch {fullname} ({message}). LLaMA-Factory runs unpatched, "
            f"`finetuning_type: blockllm` is unavailable. Set {DISABLE_ENV}=1 to turn the hook off.",
            file=sys.stderr,
        )


def _apply(fullname: str, module) -> None:
    if failures:  # after one failure, leave the rest of LLaMA-Factory as it is
        failures.setdefault(fullname, "skipped after an earlier failure")
        _refuse_blockllm(fullname, module)
        return
    try:
        # What the patch needs is checked first (patches/_surfaces.py), so that a failure names it; the patch's own
        # apply() builds everything before it assigns anything, so a failing patch changes nothing.
        from blockllm_factory.patches._surfaces import check_surfaces

        check_surfaces(fullname, module)
        __import__(WATCHED[fullname])
        sys.modules[WATCHED[fullname]].apply(module)
    except Exception as error:  # noqa: BLE001 - a patch must never break the import of LLaMA-Factory
        _report(fullname, error)
        _refuse_blockllm(fullname, module)
    else:
        applied.append(fullname)


def _refuse_blockllm(fullname: str, module) -> None:
    """Where the arguments could not be patched, ``finetuning_type: blockllm`` is still parsed, only to be refused with
    the reason (:data:`failures`), instead of LLaMA-Factory's own "Invalid fine-tuning method"."""
    if fullname != ARGUMENTS_MODULE:
        return
    try:
        from blockllm_factory.patches.arguments import apply_refusal

        apply_refusal(module)
    except Exception:  # noqa: BLE001, S110 - the stderr report above already names the failure
        pass


class _PatchFinder:
    """Meta-path finder that only ever answers for :data:`WATCHED` modules, delegating the search itself."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in WATCHED:
            return None
        try:
            spec = self._find_with_others(fullname, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                self._wrap(spec, fullname)
            return spec
        except Exception as error:  # noqa: BLE001 - fall back to the normal import, unpatched
            _report(fullname, error)
            return None

    def _find_with_others(self, fullname, path, target):
        for finder in list(sys.meta_path):
            if finder is self or isinstance(finder, _PatchFinder):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    @staticmethod
    def _wrap(spec, fullname: str) -> None:
        import importlib.machinery  # only reached when LLaMA-Factory itself is being imported

        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_patch(module) -> None:
            exec_module(module)  # an error of LLaMA-Factory's own module propagates unchanged
            _apply(fullname, module)

        if isinstance(loader, (importlib.machinery.SourceFileLoader, importlib.machinery.SourcelessFileLoader)):
            # One loader instance per module file: overriding on the instance keeps its type for everyone else.
            loader.exec_module = exec_then_patch
        else:
            spec.loader = _LoaderProxy(loader, exec_then_patch)


class _LoaderProxy:
    """Stands in for a shared loader (zip, namespace, custom) so that only this module's execution is wrapped."""

    def __init__(self, loader, exec_module) -> None:
        self._loader = loader
        self.exec_module = exec_module

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def install() -> None:
    """Registers the finder once per process (called from ``blockllm_factory.pth``); never raises."""
    try:
        if _disabled() or any(isinstance(finder, _PatchFinder) for finder in sys.meta_path):
            return
        sys.meta_path.insert(0, _PatchFinder())
    except Exception as error:  # noqa: BLE001 - never break an interpreter start
        print(f"blockllm-factory: import hook not installed ({error!r})", file=sys.stderr)
