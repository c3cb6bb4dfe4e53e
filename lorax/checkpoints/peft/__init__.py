"""LoRA adapters in Hugging Face PEFT's format (adapter_config.json + safetensors) <-> deltas.

A PEFT LoRA adapter stores, for each adapted module ``M`` of the wrapped PyTorch model,
``base_model.model.M.lora_A.weight`` [R, D_in] and ``base_model.model.M.lora_B.weight``
[D_out, R]; the module computes ``base(x) + scaling · B(A(x))`` with ``scaling = alpha/r``
(``alpha/sqrt(r)`` with rsLoRA), r and alpha per module from ``rank_pattern`` and
``alpha_pattern``. A lorax delta holds ``a`` [D_in, R] and ``b`` [R, D_out] at each kernel, so
``lora_A = a.T`` and ``lora_B = b.T`` for every family, GPT-2's Conv1D modules included.

GPT-2 fuses q, k and v into one ``c_attn`` [D, 3D]; PEFT sees one module there. Export writes
the q/k/v adapters of a layer as one ``c_attn`` adapter of rank r_q + r_k + r_v: A stacks their
A factors along the rank axis and B is block-structured (q's rows 0:D under q's rank columns,
k's rows D:2D, v's rows 2D:3D, zeros elsewhere), with each adapter's own scale folded into its
B block and alpha chosen so that PEFT's scaling is 1. Import cuts B's rows back into three
blocks, drops a block that is exactly zero, and gives each kept kernel the full A. With DoRA
the ``c_attn`` magnitude is the three kernels' end to end (an un-adapted kernel's is its base
column norms, so export then needs the base); import cuts it the same way and drops a block
only if its magnitude is also its base kernel's norms.

AdaLoRA adapters (``peft_type = "ADALORA"``) have their own pair, :func:`export_adalora` and
:func:`import_adalora` (:mod:`lorax.checkpoints.peft.adalora`).
"""

from lorax.checkpoints.peft.adalora import export_adalora, import_adalora
from lorax.checkpoints.peft.export import adapter_size_report, export_peft
from lorax.checkpoints.peft.layout import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME
from lorax.checkpoints.peft.load import import_peft, read_adapter_config

__all__ = [
    "CONFIG_NAME",
    "KEY_PREFIX",
    "WEIGHTS_NAME",
    "adapter_size_report",
    "export_adalora",
    "export_peft",
    "import_adalora",
    "import_peft",
    "read_adapter_config",
]
