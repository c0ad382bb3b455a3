"""Trainer callbacks: a progress bar, and a graceful stop on the first Ctrl-C.

The first SIGINT asks the trainer to save a checkpoint at the end of the current
step and stop (the run is then recorded ``interrupted`` and ``--resume`` picks it
up); a second SIGINT raises ``KeyboardInterrupt`` at once.
"""
from __future__ import annotations

import signal
import sys
import threading

from transformers import TrainerCallback


class ProgressBar(TrainerCallback):
    """tqdm bar over optimizer steps with the latest loss (main process only)."""

    def __init__(self, desc: str):
        self.desc = desc
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, unit="step",
                            file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class GracefulStop(TrainerCallback):
    """Turn the first SIGINT into save-checkpoint-and-stop."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nloradex: stopping after this step and saving a checkpoint (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
