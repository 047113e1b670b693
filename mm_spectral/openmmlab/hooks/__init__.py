"""OpenMMLab hooks: trainable-parameter checks and reports, adapter checkpoints, ΔW stats,
the cross-rank adapter check, random generator states for exact resume. Hooks that need a model with adapters say so with
``needs_adapters = True`` (the adapter-free config of a merged model drops them)."""

from .adapter_hook import AdapterHook, adapter_checkpoint_path
from .base import unwrap
from .delta_stats_hook import DeltaStatsHook
from .random_state_hook import RandomStateHook
from .report_hook import TrainableReportHook
from .sync_check_hook import AdapterSyncCheckHook

__all__ = [
    "AdapterHook",
    "AdapterSyncCheckHook",
    "DeltaStatsHook",
    "RandomStateHook",
    "TrainableReportHook",
    "adapter_checkpoint_path",
    "unwrap",
]
