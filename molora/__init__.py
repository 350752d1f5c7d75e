"""molora: mixtures of LoRA experts for Hugging Face transformers."""

from molora.config import MoLoRAConfig
from molora.experts import LoRAExperts, Rank1Experts
from molora.layer import MoLoRALinear
from molora.losses import AUX_LOSSES, register_aux_loss
from molora.model import MoLoRAModel, get_molora_model
from molora.patcher import InjectionReport
from molora.peft_interop import export_peft, from_peft_adapters
from molora.routers import ROUTERS, Router, RouterInputs, RouterOutput, register_router
from molora.version import __version__

__all__ = [
    "AUX_LOSSES",
    "ROUTERS",
    "InjectionReport",
    "LoRAExperts",
    "MoLoRAConfig",
    "MoLoRALinear",
    "MoLoRAModel",
    "Rank1Experts",
    "Router",
    "RouterInputs",
    "RouterOutput",
    "__version__",
    "export_peft",
    "from_peft_adapters",
    "get_molora_model",
    "register_aux_loss",
    "register_router",
]
