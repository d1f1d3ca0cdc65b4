"""sample.py: N responses per prompt from a checkpoint with the KV-cache sampler, prompts.jsonl -> samples.jsonl.

    python sample.py --model DIR --prompts prompts.jsonl --out samples.jsonl --template merlinite -n 4
    torchrun --nproc_per_node 8 sample.py ...      # prompts split across ranks, one merged output file

The flags are the fields of minalign.sample.SampleConfig, and the stage is minalign.sample.sample (its docstring
says the rest); `python sample.py --help` lists every flag.
"""
from minalign import cli, distributed
from minalign.errors import ConfigError
from minalign.sample import SampleConfig, SampleSection, check_config, sample


def parse_args(argv: list[str] | None) -> SampleConfig:
    """The command line as the stage's config; a bad flag is a ConfigError (one line and status 2 from main)."""
    cfg = cli.parse_stage(cli.stage_parser(__doc__, SampleConfig), SampleConfig, argv)
    if cfg.best_of:  # --best-of N samples N responses: -n, if given, must agree
        if cfg.sample.n not in (SampleSection.n, cfg.best_of):
            raise ConfigError("--best-of N sets the number of samples: leave out -n")
        cfg.sample.n = cfg.best_of
    check_config(cfg)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run sample.py; returns the exit status (0 done, 2 bad input or settings, 130 interrupted)."""
    return cli.main("sample.py", argv, parse_args, sample, kept="finished prompts")


if __name__ == "__main__":
    distributed.exit(main())
