"""Callbacks: export in HF format, metrics to JSON, generation reward during validation."""

from callbacks.export_pretrained import ExportPretrained, export_pretrained
from callbacks.generation_reward import GenerationReward
from callbacks.metrics_json import MetricsJSON

__all__ = ["ExportPretrained", "GenerationReward", "MetricsJSON", "export_pretrained"]
