"""``python -m pipeline``: the train -> push pipeline's command line (:mod:`pipeline.cli`)."""

from pipeline.cli import main

main()
