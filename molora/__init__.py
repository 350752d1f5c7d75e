"""molora: mixtures of LoRA experts for Hugging Face transformers.

The package, bottom to top (a module imports only its own layer and those below; tests/test_package_layers.py):
files (format versions, strict JSON, safetensors, the Hub) < core (what a mixture is) < deploy (adapter files,
merging, INT8, PEFT's format) < model (MoLoRAModel) < analysis (routing reports, ranks) < run (the training run)
< ablation < cli. The names below are the public ones; the module paths of the flat layout before the packages
(molora.config, molora.training, ...) still import, as the modules that now hold them.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from molora.core.base_layers import BASE_LAYERS, prepare_for_kbit_training, register_base_layer
from molora.core.config import MoLoRAConfig
from molora.core.experts import LoRAExperts, Rank1Experts
from molora.core.layer import MoLoRALinear
from molora.core.losses import AUX_LOSSES, register_aux_loss
from molora.core.patcher import InjectionReport
from molora.core.routers import ROUTERS, Router, RouterInputs, RouterOutput, register_router
from molora.deploy.peft_files import export_peft
from molora.model import MoLoRAModel, get_molora_model
from molora.version import __version__

from_peft_adapters = MoLoRAModel.from_peft_adapters

# molora.<old name> -> the module that holds it now (the flat layout up to molora 0.1.0's packages).
MOVED_MODULES = {
    "file_formats": "files.formats",
    "tensor_files": "files.tensors",
    "hub": "files.hub",
    "allocation": "core.allocation",
    "config": "core.config",
    "experts": "core.experts",
    "memory": "core.memory",
    "gating": "core.gating",
    "pooling": "core.pooling",
    "routers": "core.routers",
    "losses": "core.losses",
    "context": "core.context",
    "inputs": "core.inputs",
    "positions": "core.positions",
    "layer": "core.layer",
    "patcher": "core.patcher",
    "rank_gates": "core.rank_gates",
    "inspect": "analysis.routing_report",  # the recorder itself: core.recording (imported there too)
    "adapter_load": "deploy.adapter_files",
    "merging": "deploy.merging",
    "quantize": "deploy.quantize",
    "peft_interop": "deploy.peft_files",
    "stats": "analysis.stats",
    "ranks": "analysis.ranks",
    "rank_report": "analysis.rank_report",
    "run_config": "run.config",
    "base_models": "run.base_models",
    "domains": "run.domains",
    "user_files": "run.user_files",
    "data": "run.data",
    "run_setup": "run.setup",
    "training": "run.training",
    "resume": "run.resume",
    "checkpoint": "run.checkpoint",
    "trainer_state": "run.trainer_state",
    "evaluation": "run.evaluation",
    "reporting": "run.reporting",
    "integrations": "run.integrations",
    "ablation_report": "ablation.report",
    "reevaluate": "ablation.reevaluate",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import molora.config` gives the module molora.core.config itself (one module object, two names)."""

    def find_spec(self, fullname, path=None, target=None):
        old = fullname.removeprefix(f"{__name__}.")
        if old == fullname or old not in MOVED_MODULES:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        module = importlib.import_module(f"{__name__}.{MOVED_MODULES[spec.name.rpartition('.')[2]]}")
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the module keeps its own name and spec


sys.meta_path.append(_MovedModuleFinder())

__all__ = [
    "AUX_LOSSES",
    "BASE_LAYERS",
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
    "prepare_for_kbit_training",
    "register_aux_loss",
    "register_base_layer",
    "register_router",
]
