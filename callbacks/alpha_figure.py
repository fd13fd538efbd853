"""`AlphaFigure`: the multi-reference weights α over training, as a stacked area plot.

Every optimizer step it records the batch mean of α (`MultiReferenceModule.last_alphas`, one value per
reference). After each validation and at the end of fit it draws the history (x: step, y: α stacked to
1, one band per reference) into TensorBoard (`alpha` under the Images tab) and into `alpha.png` in the
run directory. The history is saved in checkpoints (the resume contract), so a resumed run's figure
covers the whole run.
"""

from __future__ import annotations

import io
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from datamodules.utils.files import write_bytes_atomic
from lightning_modules.runtime.run_dir import resolve_in_run_dir


class AlphaFigure(L.Callback):
    """Stacked α-over-steps figure of a multi-reference run, in TensorBoard and `<run dir>/<path>`."""

    def __init__(self, path: str = "alpha.png"):
        """Output.

        Args:
            path: PNG file rewritten after every validation and at fit end; relative = in the run directory.
        """
        self.path = path
        self.steps: list[int] = []
        self.alphas: list[list[float]] = []
        self.names: list[str] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        alphas = getattr(pl_module, "last_alphas", None)
        if alphas is None or (self.steps and self.steps[-1] == trainer.global_step):
            return  # not multi-reference, or a micro-batch within the same optimizer step
        self.steps.append(trainer.global_step)
        self.alphas.append([float(a) for a in alphas])
        self.names = pl_module.reference_names(len(alphas))

    def figure(self):
        """The matplotlib figure of the history (None before the first step)."""
        if not self.steps:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        columns = list(zip(*self.alphas))
        ax.stackplot(self.steps, columns, labels=self.names, step="post" if len(self.steps) > 1 else None)
        ax.set(xlabel="optimizer step", ylabel="α (batch mean)", ylim=(0, 1), xlim=(self.steps[0], self.steps[-1]))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        fig.tight_layout()
        return fig

    def _draw(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        fig = self.figure()
        if fig is None:
            return
        import matplotlib.pyplot as plt

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("alpha", fig, global_step=trainer.global_step, close=False)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        plt.close(fig)
        write_bytes_atomic(resolve_in_run_dir(self.path, trainer), buffer.getvalue())

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "alphas": [list(a) for a in self.alphas], "names": list(self.names)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps, self.alphas = list(state_dict["steps"]), [list(a) for a in state_dict["alphas"]]
        self.names = list(state_dict["names"])
