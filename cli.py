"""Command line of the toolkit: ``python cli.py {fit,validate,test,predict} --recipe NAME ...`` (see docs/training.md)."""

if __name__ == "__main__":  # import-safe under DDP, which re-runs this script once per rank
    from finetune.cli import main

    raise SystemExit(main())
