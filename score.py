"""score.py: the DPO log-ratio reward of every sampled response, samples.jsonl -> scores.jsonl.

    python score.py --samples samples.jsonl --policy MIXTRAL_INSTRUCT_DIR --reference MIXTRAL_DIR --out scores.jsonl
    torchrun --nproc_per_node 8 score.py ...           # the responses shared out, one merged output file
    torchrun --nproc_per_node 8 score.py --fsdp ...    # and each model sharded over the ranks (FSDP2)

The stage is minalign/stages/score.py (its docstring says the rest); `python score.py --help` lists every flag.
"""
from minalign import distributed
from minalign.stages.score import main

if __name__ == "__main__":
    distributed.exit(main())
