"""The paper's GLUE experiment (appendix A.5) through the Trainer front: ``blockllm-factory glue recipes/glue/T.yaml``.

RoBERTa on a GLUE task with BlockLLM (:mod:`blockllm_factory.hf`), GaLore (transformers' ``optim: galore_adamw``) and
full fine-tuning, each in the real transformers ``Trainer``, reporting the task's metric and the memory measured
during training side by side (docs/hf.md).
"""
