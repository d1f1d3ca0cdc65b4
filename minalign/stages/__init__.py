"""The stages of an alignment round, each a command line that reads files and writes files atomically:
sample.py (prompts -> samples) and score.py (samples -> scores) run these modules' `main`; the loop
(minalign/loop.py) runs their `run` under its own process group."""
