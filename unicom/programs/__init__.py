"""The library side of the command-line programs: each has ``get_args_parser()`` and ``main(argv)``."""
