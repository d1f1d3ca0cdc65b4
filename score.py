"""score.py: a reward for every sampled response (the DPO log-ratio, or any reward source), samples.jsonl -> scores.jsonl.

    python score.py --samples samples.jsonl --policy MIXTRAL_INSTRUCT_DIR --policy-template mistral \
        --reference MIXTRAL_DIR --reference-template raw --out scores.jsonl
    torchrun --nproc_per_node 8 score.py ...           # the responses shared out, one merged output file
    torchrun --nproc_per_node 8 score.py --fsdp ...    # and each model sharded over the ranks (FSDP2)

The flags are the fields of minalign.score.ScoreConfig, and the stage is minalign.score.score (its docstring
says the rest); `python score.py --help` lists every flag.
"""
from minalign import cli, distributed
from minalign.score import ScoreConfig, check_config, score


def parse_args(argv: list[str] | None) -> ScoreConfig:
    """The command line as the stage's config; a bad flag is a ConfigError (one line and status 2 from main)."""
    cfg = cli.parse_stage(cli.stage_parser(__doc__, ScoreConfig), ScoreConfig, argv)
    check_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run score.py; returns the exit status (0 done, 2 bad input or settings, 130 interrupted)."""
    return cli.main("score.py", argv, parse_args, score, kept="finished log-probs")


if __name__ == "__main__":
    distributed.exit(main())
