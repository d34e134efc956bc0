"""Every change blockllm-factory makes to LLaMA-Factory, installed as ``blockllm_factory.patches``.

``blockllm_factory/_import_hook.py`` (``WATCHED``) runs one module's ``apply(module)`` right after each watched
LLaMA-Factory module executes; ``_surfaces.py`` lists what each of them needs. Patch modules, one per surface:
``arguments``, ``parser``, ``adapter``, ``optimizer``, ``trainer``, ``metrics``, ``webui``, ``webui_locales``.

Helpers they call, one concern each:

* parse time: ``launch`` (launchers and loaders refused), ``precision`` (``optim``), ``checkpoints`` (never resume
  an interrupted save), ``engine_setup`` (DDP/FSDP/DeepSpeed arguments), ``deepspeed_config`` (the DeepSpeed config),
  ``serialization`` (torch's ``cpu:N`` storage location, for multi-process CPU resume), ``model_checks``;
* optimizer and trainer: ``engine`` (which engine, which optimizer class), ``engine_wiring`` (the engine's loss feed
  and callbacks), ``telemetry`` (the selection log and plot);
* ``_version`` and ``_surfaces``: what installation is supported.
"""
