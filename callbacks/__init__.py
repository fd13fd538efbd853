"""Callbacks: export in HF format, metrics to JSON, generation reward during validation, prediction JSONL."""

from callbacks.export_pretrained import ExportPretrained, export_pretrained
from callbacks.generation_reward import GenerationReward
from callbacks.metrics_json import MetricsJSON
from callbacks.prediction_writer import JSONLPredictionWriter

__all__ = ["ExportPretrained", "GenerationReward", "JSONLPredictionWriter", "MetricsJSON", "export_pretrained"]
