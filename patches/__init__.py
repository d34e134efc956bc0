"""Every change blockllm-factory makes to LLaMA-Factory, installed as ``blockllm_factory.patches``.

``blockllm_factory/_import_hook.py`` (``WATCHED``) runs one module's ``apply(module)`` right after each watched
LLaMA-Factory module executes; ``_surfaces.py`` lists what each of them needs. Patch modules, one per surface:
``arguments``, ``parser``, ``adapter``, ``optimizer``, ``trainer``, ``metrics``, ``webui``, ``webui_locales``.

Helpers they call, one concern each:

* parse time: ``launch`` (launchers and loaders refused), ``precision`` (``optim``), ``checkpoints`` (never resume
  an interrupted save), ``engine_setup`` (DDP/FSDP/DeepSpeed arguments; the DeepSpeed config is checked by
  ``blockllm_factory.hf.deepspeed_config``, and ``blockllm_factory.hf.serialization`` lets a multi-process CPU run
  resume), ``model_checks``;
* optimizer and trainer: they build on the Trainer wiring both fronts share, in ``blockllm_factory.hf``
  (``optimizer``: the builder; ``wiring``: loss feed, clipping, the engine's callbacks; ``engine``: which engine,
  which optimizer class, which moment precision; ``telemetry``: the selection log and plot); ``precision`` keeps
  LLaMA-Factory's weight-precision rule;
* ``_version`` and ``_surfaces``: what installation is supported.
"""
