"""`lmfusion-jax` subcommands: each module exposes `add_arguments(parser)` and `run(args) -> int`
(registered by name in lmfusion_jax/cli.py)."""
