"""tpfx: make a single-device PyTorch model tensor-parallel by compiling it, not by rewriting it.

    gm = tpfx.parallelize(model, tp=2)   # inside torchrun, after dist.init_process_group
"""

# Imported here, before any process group exists, on purpose. torch.distributed._shard (which
# torch._dynamo imports: FakeTensor shape propagation and torch.export both pull it in), when first
# imported while a gloo group exists, keeps that group's backend alive past destroy_process_group:
# its worker threads (pt_gloo_runloop, gloo_tcp_loop) run on to interpreter exit, where their teardown
# races Python's finalization and, now and then, aborts the process ("terminate called without an
# active exception", SIGABRT). Importing it first costs ~0.03 s and makes the teardown clean.
import torch.distributed._shard  # noqa: F401  (side effect: see above)

from tpfx.api import parallelize
from tpfx.capture import CallForm, capture
from tpfx.checkpoint import full_state_dict, load_state_dict, parameter_shard_specs, save_pretrained
from tpfx.dcp import dcp_state_dict
from tpfx.deferred import DeferredProgram
from tpfx.errors import (CaptureError, CollectiveError, ConfigError, DefaultTimeoutWarning, LoadError, NoSitesWarning,
                         ReplicaError, ShardingError, TpfxError, TpfxWarning)
from tpfx.layers import ColumnParallelLinear, ShardSpec
from tpfx.meta_init import parameters_on_meta
from tpfx.program import TensorParallelModule

__version__ = "0.1.0"

__all__ = ["parallelize", "capture", "CallForm", "ColumnParallelLinear", "TensorParallelModule", "DeferredProgram",
           "TpfxError", "CaptureError", "ConfigError", "ShardingError", "LoadError", "ReplicaError",
           "CollectiveError", "TpfxWarning", "NoSitesWarning", "DefaultTimeoutWarning",
           "__version__",
           "load_state_dict", "full_state_dict", "save_pretrained", "dcp_state_dict", "parameter_shard_specs", "parameters_on_meta", "ShardSpec"]
