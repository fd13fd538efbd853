"""Callbacks: export in HF format, metrics to JSON, generation reward during validation, prediction JSONL, α figures."""

from callbacks.alpha_figure import AlphaFigure
from callbacks.degeneration import DegenerationDetector
from callbacks.export_pretrained import ExportPretrained, export_pretrained
from callbacks.generation_reward import GenerationReward
from callbacks.metrics_json import MetricsJSON
from callbacks.prediction_writer import JSONLPredictionWriter
from callbacks.reference_sync import ReferenceSync

__all__ = ["AlphaFigure", "DegenerationDetector", "ExportPretrained", "GenerationReward", "JSONLPredictionWriter", "MetricsJSON",
           "ReferenceSync", "export_pretrained"]
