"""sample.py: N responses per prompt from a checkpoint with the KV-cache sampler, prompts.jsonl -> samples.jsonl.

    python sample.py --model DIR --prompts prompts.jsonl --out samples.jsonl --template merlinite -n 4
    torchrun --nproc_per_node 8 sample.py ...      # prompts split across ranks, one merged output file

The stage is minalign/stages/sample.py (its docstring says the rest); `python sample.py --help` lists every flag.
"""
from minalign import distributed
from minalign.stages.sample import main

if __name__ == "__main__":
    distributed.exit(main())
