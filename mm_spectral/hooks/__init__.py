"""OpenMMLab hooks: trainable-parameter checks and reports, adapter checkpoints, ΔW stats."""

from .adapter_hook import AdapterHook, TrainableReportHook, adapter_checkpoint_path
from .adapter_sync_hook import AdapterSyncCheckHook
from .delta_stats_hook import DeltaStatsHook, amplification, delta_stats

__all__ = [
    "AdapterSyncCheckHook",
    "AdapterHook",
    "DeltaStatsHook",
    "TrainableReportHook",
    "adapter_checkpoint_path",
    "amplification",
    "delta_stats",
]
