"""`python -m tests.train_driver MODE N -- molora-train args`: a training process that stops where a test kills it.

MODE "after-save": pause (print PAUSED, sleep) right after the checkpoint of step N is renamed into place.
MODE "in-write": pause while the checkpoint of step N is being written (its files staged, before the manifest).
MODE "none": run to the end. The test kills the paused process with SIGKILL.
"""

from __future__ import annotations

import sys
import time

import molora.run.checkpoint
import molora.run.training
from molora.cli import train_main


def pause() -> None:
    print("PAUSED", flush=True)
    time.sleep(600)


def main() -> int:
    mode, step, args = sys.argv[1], int(sys.argv[2]), sys.argv[4:]
    if mode == "after-save":
        real_save = molora.run.training.save_checkpoint

        def save_then_pause(run_dir, model, save_adapter, state, at_step, keep):
            folder = real_save(run_dir, model, save_adapter, state, at_step, keep)
            if at_step == step:
                pause()
            return folder

        molora.run.training.save_checkpoint = save_then_pause
    elif mode == "in-write":
        real_manifest = molora.run.checkpoint.write_manifest

        def manifest_then_pause(folder, at_step):
            if at_step == step:
                (folder / "adapter_model.safetensors").write_bytes(b"half")  # as a kill mid-write would leave it
                pause()
            real_manifest(folder, at_step)

        molora.run.checkpoint.write_manifest = manifest_then_pause
    return train_main(args)


if __name__ == "__main__":
    sys.exit(main())
