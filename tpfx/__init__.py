"""tpfx: make a single-device PyTorch model tensor-parallel by compiling it, not by rewriting it.

    gm = tpfx.parallelize(model, tp=2)   # inside torchrun, after dist.init_process_group
"""

from tpfx.api import parallelize
from tpfx.capture import CallForm, capture
from tpfx.checkpoint import full_state_dict, load_state_dict, parameter_shard_specs
from tpfx.errors import (CaptureError, CollectiveError, ConfigError, DefaultTimeoutWarning, LoadError, NoSitesWarning,
                         ReplicaError, ShardingError, TpfxError, TpfxWarning)
from tpfx.layers import ColumnParallelLinear, ShardSpec
from tpfx.meta_init import parameters_on_meta
from tpfx.program import TensorParallelModule

__version__ = "0.1.0"

__all__ = ["parallelize", "capture", "CallForm", "ColumnParallelLinear", "TensorParallelModule",
           "TpfxError", "CaptureError", "ConfigError", "ShardingError", "LoadError", "ReplicaError",
           "CollectiveError", "TpfxWarning", "NoSitesWarning", "DefaultTimeoutWarning",
           "__version__",
           "load_state_dict", "full_state_dict", "parameter_shard_specs", "parameters_on_meta", "ShardSpec"]
