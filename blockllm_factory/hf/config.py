"""``BlockLLMConfig``: the ``blockllm_*`` settings for the Trainer front, the same fields as LLaMA-Factory's YAML.

Built from the settings table (``blockllm_factory/optim/settings.py``, ``BlockLLMArguments``), so a new setting
appears here by itself, with the YAML's default, help text and error message: ``BlockLLMConfig(blockllm_sparsity=1.5)``
is refused with exactly the message ``blockllm_sparsity: 1.5`` gets in a LLaMA-Factory YAML. lr, betas, eps, weight
decay, the seed and the precision of the Adam moments (``optim``) come from the ``TrainingArguments``, as for every
optimizer the Trainer builds.
"""

import dataclasses

from blockllm_factory.optim.settings import BlockLLMArguments, check_arguments


@dataclasses.dataclass
class BlockLLMConfig(BlockLLMArguments):
    """BlockLLM's settings (``blockllm_sparsity``, ``blockllm_patience``, ...), checked when created."""

    def __post_init__(self) -> None:
        check_arguments(self)
