"""score.py: a reward for every sampled response (samples.jsonl -> scores.jsonl), or one file's win rate over another.

    python score.py --samples samples.jsonl --policy MIXTRAL_INSTRUCT_DIR --policy-template mistral \
        --reference MIXTRAL_DIR --reference-template raw --out scores.jsonl
    torchrun --nproc_per_node 8 score.py ...           # the responses shared out, one merged output file
    torchrun --nproc_per_node 8 score.py --fsdp ...    # and each model sharded over the ranks (FSDP2)
    python score.py --candidate new.jsonl --baseline old.jsonl --judge pairrm:PAIRRM_DIR --out compare.json

The flags are the fields of minalign.score.ScoreConfig, and the stage is minalign.score.score (its docstring
says the rest); `python score.py --help` lists every flag. Compare mode (--candidate, --baseline, --judge) is
minalign.compare.compare_stage with the flags of minalign.compare.CompareConfig: `python score.py --candidate
x --help` lists them.
"""
import sys

from minalign import cli, compare, distributed
from minalign.score import ScoreConfig, check_config, score

COMPARE_FLAGS = ("--candidate", "--baseline", "--judge")  # any of these: compare mode


def parse_args(argv: list[str] | None) -> ScoreConfig | compare.CompareConfig:
    """The command line as the stage's config; a bad flag is a ConfigError (one line and status 2 from main)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a.split("=", 1)[0] in COMPARE_FLAGS for a in argv):
        doc = "score.py: the win rate of one samples file's responses over another's (minalign/compare.py)"
        cfg = cli.parse_stage(cli.stage_parser(doc, compare.CompareConfig), compare.CompareConfig, argv)
        compare.check_config(cfg)
        return cfg
    cfg = cli.parse_stage(cli.stage_parser(__doc__, ScoreConfig), ScoreConfig, argv)
    check_config(cfg)
    return cfg


def run(cfg, rank: int, world: int, device) -> None:
    """The stage the config is for: compare mode or scoring."""
    (compare.compare_stage if isinstance(cfg, compare.CompareConfig) else score)(cfg, rank, world, device)


def main(argv: list[str] | None = None) -> int:
    """Run score.py; returns the exit status (0 done, 2 bad input or settings, 130 interrupted)."""
    return cli.main("score.py", argv, parse_args, run, kept="finished log-probs",
                    interrupted=lambda cfg: "nothing was written; run it again" if isinstance(
                        cfg, compare.CompareConfig) else None)


if __name__ == "__main__":
    distributed.exit(main())
