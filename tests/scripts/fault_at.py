"""Run a trainer (or an exporter) with a signal sent to itself at a named point of its
run, to test the state each fault leaves: ``fault_at.py POINT CALL SIGNAL MODULE [flags]``.

POINT is a function the trainer calls at that moment (the signal goes before the
CALL-th call of it runs); SIGNAL is KILL or INT. The rest is the trainer's command line,
run as ``python -m MODULE`` runs it.
"""

import importlib
import os
import signal
import sys

POINTS = {
    # a backup written into its staging folder, before it is published
    "commit_backup": ("keras_vae_attn.callbacks", "commit_backup"),
    # training done, model/ not yet saved
    "save_vae": ("keras_vae_attn.models", "save_vae"),
    # model/ written into its staging folder, before it is published
    "publish_model": ("keras_vae_attn.models.io", "publish"),
    # the ONNX exporter about to convert the traced graph
    "onnx_convert": ("export.onnx", "convert"),
}


def main():
    point, call, signame, module, *argv = sys.argv[1:]
    owner_name, attribute = POINTS[point]
    owner = importlib.import_module(owner_name)
    original = getattr(owner, attribute)
    calls = []

    def faulty(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(call):
            os.kill(os.getpid(), getattr(signal, f"SIG{signame}"))
        return original(*args, **kwargs)

    setattr(owner, attribute, faulty)
    from trainers import guard

    trainer = importlib.import_module(module)
    guard.main_guard(lambda: trainer.main(argv))


if __name__ == "__main__":
    main()
